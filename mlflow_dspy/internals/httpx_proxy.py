"""Whether httpx would send a request through a proxy, asked of httpx itself, which does not say so in public.

The gateway's LM calls go over its own small HTTP/1.1 client (lm_engine/http1.py), except where a proxy
applies to the LM's URL: httpx carries those, as it does every call of the sync engine, so both engines
follow the same proxy rules (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY). httpx decides per URL in
`Client._transport_for_url`, which returns the client's own `_transport` unless a proxy's mounted
transport matches. tests/test_internals_httpx_proxy.py pins that, with real variables. Without those
names, every call goes through httpx (proxies then still work; only the fast path is lost).

This is not a speed-up: it stays on with `MLFLOW_DSPY_SPEEDUPS=0`.
"""

from __future__ import annotations

import httpx


def proxy_applies(client: httpx.AsyncClient | httpx.Client, url: str) -> bool:
    """Whether `client` (made with trust_env, httpx's default) sends a request for `url` through a proxy."""
    try:
        return client._transport_for_url(httpx.URL(url)) is not client._transport
    except AttributeError:  # an httpx without these (private) names: let httpx carry the call, proxy or not
        return True
