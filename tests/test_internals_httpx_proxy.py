"""httpx still says, through the private names internals/httpx_proxy.py asks, whether a proxy applies to a
URL: with HTTP_PROXY set a plain-HTTP URL is proxied, one NO_PROXY covers is not, and with no variable nothing
is."""

from __future__ import annotations

import httpx
import pytest

from mlflow_dspy.internals.httpx_proxy import proxy_applies

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                   "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_variables(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_private_names_it_asks_are_still_there():
    client = httpx.Client()
    assert hasattr(client, "_transport_for_url") and hasattr(client, "_transport"), \
        "httpx no longer has Client._transport_for_url/_transport: rewrite internals/httpx_proxy.py"


@pytest.mark.parametrize("client_class", [httpx.Client, httpx.AsyncClient])
def test_a_proxy_applies_where_the_variables_say_and_nowhere_else(no_proxy_variables, client_class):
    assert not proxy_applies(client_class(), "http://lm.example/v1/chat/completions")
    no_proxy_variables.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    no_proxy_variables.setenv("NO_PROXY", "internal.example")
    client = client_class()
    assert proxy_applies(client, "http://lm.example/v1/chat/completions")
    assert not proxy_applies(client, "http://internal.example/v1/chat/completions")
    assert not proxy_applies(client, "https://lm.example/v1/chat/completions")  # HTTP_PROXY: plain HTTP only
