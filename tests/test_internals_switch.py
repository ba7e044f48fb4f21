"""One switch turns off every speed-up built on DSPy's and uvicorn's internals, and the gateway then
answers the same through their own code paths (the header limits, a defence, stay on)."""

from __future__ import annotations

import asyncio
import json

import dspy
import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlflow_dspy.internals import SPEEDUPS_ENV, dspy_chat_adapter, dspy_executor, speedups_enabled, uvicorn_protocol
from tests.conftest import SHARED_TARGET
from tests.support.processes import gateway_process


@pytest.mark.parametrize("value", ["0", "false", "off", "no", " OFF "])
def test_the_switch_reads_off_in_the_usual_spellings(monkeypatch, value):
    monkeypatch.setenv(SPEEDUPS_ENV, value)
    assert not speedups_enabled()


def test_the_speedups_are_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv(SPEEDUPS_ENV, raising=False)
    assert speedups_enabled()
    assert type(dspy_chat_adapter.serving_adapter(None)) is dspy_chat_adapter.ServingChatAdapter
    assert uvicorn_protocol.http_protocol() is uvicorn_protocol.CoalescingHttpToolsProtocol


def test_turned_off_each_speedup_gives_way_to_the_librarys_own_code(monkeypatch):
    monkeypatch.setenv(SPEEDUPS_ENV, "0")
    assert type(dspy_chat_adapter.serving_adapter(None)) is dspy.ChatAdapter
    protocol = uvicorn_protocol.http_protocol()
    # uvicorn's own writes (no coalescing), with the header limits still on.
    assert protocol is uvicorn_protocol.GuardedHttpToolsProtocol and issubclass(protocol, HttpToolsProtocol)

    async def main():
        loop = asyncio.get_running_loop()
        installed = dspy_executor.install()
        return installed, getattr(loop, "_default_executor", None)

    installed, executor = asyncio.run(main())
    assert installed is False
    assert not isinstance(executor, dspy_executor.BookkeepingInlineExecutor)


def _answers(url: str) -> tuple[dict, str]:
    body = {"model": "dspy-qa", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with httpx.Client(base_url=url, timeout=60) as client:
        whole = client.post("/v1/chat/completions", json=body).json()
        text = ""
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
    return whole["choices"][0]["message"], text


def test_a_gateway_with_no_speedups_answers_as_one_with_them(shared_gateway, stub_env, tmp_path):
    # Real processes: the speed-ups include uvicorn's protocol. The shared gateway has them on.
    fast_answers = _answers(shared_gateway.url)
    with gateway_process(SHARED_TARGET, tmp_path, "--no-speedups", **stub_env) as plain:
        plain_answers = _answers(plain.url)
        # The limits are no speed-up: still on.
        too_big = httpx.get(plain.url + "/health", headers={"X-Big": "a" * 9000})
    assert "speed-ups on DSPy's and uvicorn's internals: on" in shared_gateway.log_text()
    assert f"speed-ups on DSPy's and uvicorn's internals: off ({SPEEDUPS_ENV}=0)" in plain.log_text()
    assert fast_answers == plain_answers and plain_answers[1] == plain_answers[0]["content"]
    assert too_big.status_code == 431
