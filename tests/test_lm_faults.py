"""LM faults through the gateway: the right status, an OpenAI error object, bounded retries
with backoff, cancellation when the client leaves, error events in streams, recovery. Through the shared
gateway process (`--request-timeout 10`) on the shared stub LM, whose faults come from markers in the
question; the LM starting late, with the gateway app in process."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import STUB_KEY
from tests.support.inprocess import asgi_client, gateway_app
from tests.support.processes import free_port, stub_lm, stub_mode, stub_requests, stub_stats

RETRIES = 3  # lm_engine.select.RETRIES


def chat(base: str, question: str, **extra) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": question}], **extra})


def stream_events(base: str, question: str) -> list:
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": question}], "stream": True}) as response:
        assert response.status_code == 200  # a stream's status is sent before the LM answers
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def attempts(stub: str, marker: str) -> list[float]:
    """When the stub was asked the question carrying `marker`, oldest first."""
    return [r["t"] for r in stub_requests(stub) if marker in json.dumps(r["body"])]


@pytest.fixture(scope="module")
def rig(stub, shared_gateway):
    return stub, shared_gateway.url


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert "Traceback" not in response.text and STUB_KEY not in response.text  # nor the LM's key
    return error


def test_each_fault_gets_its_status_and_an_error_object(rig):
    _stub, base = rig
    faults = {  # question -> (status, code)
        "[fail500] q1": (502, "lm_error"),
        "[rate429] q2": (429, "lm_rate_limited"),
        "[sleep] q3": (504, "lm_timeout"),
        "[garbage] q4": (502, "lm_output_unparseable"),
        "[cut] q5": (502, "lm_error"),
        "[trickle] q6": (504, "lm_timeout"),
    }
    with ThreadPoolExecutor(len(faults)) as pool:  # at once: each waits out its own backoff or timeout
        answers = dict(zip(faults, pool.map(lambda q: chat(base, q), faults), strict=True))
    for question, (status, code) in faults.items():
        assert_error(answers[question], status, code)
    assert answers["[rate429] q2"].headers["Retry-After"] == "1"
    assert chat(base, "still there?").status_code == 200  # and the gateway serves on


def test_transient_failures_are_retried_a_bounded_number_of_times_with_growing_backoff(rig):
    stub, base = rig
    assert_error(chat(base, "[fail500] backoff"), 502, "lm_error")
    times = attempts(stub, "[fail500] backoff")
    assert len(times) == 1 + RETRIES
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == sorted(gaps) and gaps[0] >= 0.9  # 1 s, 2 s, 4 s (DSPy's backoff)


def test_a_rate_limit_with_a_short_retry_after_is_waited_for_then_reported(rig):
    stub, base = rig
    assert_error(chat(base, "[rate429] polite"), 429, "lm_rate_limited")
    times = attempts(stub, "[rate429] polite")
    assert len(times) == 1 + RETRIES
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times))


def test_a_client_that_leaves_cancels_the_lm_call_in_flight(rig):
    stub, base = rig
    before = stub_stats(stub)["abandoned"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", timeout=1.5,
                   json={"messages": [{"role": "user", "content": "[sleep] I will not wait"}]})
    for _ in range(50):  # the stub notices within ~0.1 s of the gateway closing the LM connection
        if stub_stats(stub)["abandoned"] > before:
            break
        httpx.get(f"{base}/health")
        time.sleep(0.2)
    assert stub_stats(stub)["abandoned"] == before + 1
    assert chat(base, "after the leaver").status_code == 200


@pytest.mark.parametrize(("marker", "code"), [("[cut]", "lm_error"), ("[trickle]", "lm_timeout"),
                                              ("[fail500]", "lm_error")])
def test_a_stream_that_fails_midway_ends_with_an_error_event_not_a_silent_cut(rig, marker, code):
    _, base = rig
    events = stream_events(base, f"{marker} stream")
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == code and error["message"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason") == "stop"
                   for e in events)


def test_when_the_lm_comes_back_the_gateway_serves_again_without_a_restart(rig):
    stub, base = rig
    with stub_mode(stub, "fail500"):
        assert_error(chat(base, "while down"), 502, "lm_error")
    assert chat(base, "back up").json()["choices"][0]["message"]["content"] == "answer: back up"


async def test_connection_refused_is_a_502_and_the_lm_starting_later_is_picked_up(tmp_path):
    port = free_port()  # nothing listens here yet
    async with asgi_client(gateway_app(f"http://127.0.0.1:{port}/v1", request_timeout=30)) as client:
        down = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "anyone?"}]})
        assert_error(down, 502, "lm_error")
        with stub_lm(tmp_path, port=port):
            now = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "now?"}]})
            assert now.status_code == 200
