"""The programs' prompts the embedded-serving tests replay (tests/data/embedded_requests.json, captured once
from real runs on the embedded model) are still the ones DSPy and the example programs write today."""

from __future__ import annotations

import pytest

from tests.support import embedded_requests


@pytest.mark.parametrize("conversation", embedded_requests.load(),
                         ids=lambda c: f"{c['program']}-{len(c['turns'])}turns-{c['turns'][-1][:20]}")
def test_each_captured_request_is_what_dspy_writes_today(conversation):
    """The prompt, the history, the output schema and the settings of each conversation's requests: made again
    without the model, they equal the file's. A difference means DSPy, an adapter or an example changed:
    regenerate the file with `python -m tests.support.embedded_requests --capture`."""
    captured = [embedded_requests.from_json(r) for r in conversation["requests"]]
    today = embedded_requests.rebuild(conversation["program"], conversation["turns"])
    assert len(today) >= len(captured) >= 1
    assert today[:len(captured)] == captured


def test_the_captured_requests_cover_every_example_with_multi_turn_conversations():
    conversations = embedded_requests.load()
    assert [(c["program"], c["turns"]) for c in conversations] == [
        (program, turns) for program, all_turns in embedded_requests.CONVERSATIONS.items() for turns in all_turns]
    requests = embedded_requests.requests()
    assert len(requests) >= 24 and all(r.config.response_format for r in requests)
    assert sum(len(r.messages) > 1 or "history" in (r.system or "") for r in requests) >= 4


def test_a_request_survives_the_round_trip_through_json():
    for request in embedded_requests.requests():
        assert embedded_requests.from_json(embedded_requests.to_json(request)) == request
