"""finish_reason "length" when any LM call of a run was cut, though its answer parsed (lm_engine/finishes.py):
the engines note why each call ended, the run reads the notes."""

from __future__ import annotations

import json

import dspy
import pytest

from mlflow_dspy.lm_engine import finishes
from mlflow_dspy.lm_engine.openai_http import response_from
from mlflow_dspy.lm_engine.select import adapter_for, build_lm
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.inprocess import asgi_client, gateway_app


class DraftThenAnswer(dspy.Module):
    """Two LM calls a request, as most real programs make."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.final = dspy.Predict("question, draft -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.final(question=question, draft=self.draft(question=question).draft)


def completion(finish: str) -> dict:
    return {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}


def test_the_http_engine_notes_each_calls_finish_reason_for_the_run_listening():
    response_from(completion("length"))  # no run listening: nothing kept, nothing fails
    with finishes.finish_reasons() as reasons:
        response_from(completion("length"))
        response_from(completion("stop"))
    assert reasons == ["length", "stop"]
    with finishes.finish_reasons() as other:
        pass
    assert other == []


async def finish_reason(client, question: str, stream: bool) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": question}], "stream": stream}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        return choice["finish_reason"], choice["message"]["content"]
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return finish, content


@pytest.mark.parametrize("stream", [False, True])
async def test_a_program_whose_lm_calls_were_cut_answers_with_finish_reason_length(stub, stream):
    lm = build_lm("openai/stub-echo", stub)
    host = ProgramHost(ChatProgram(DraftThenAnswer()), lm, adapter_for(lm), "draft-then-answer", "test")
    async with asgi_client(gateway_app(host=host)) as client:
        assert await finish_reason(client, "Why? [length]", stream) == ("length", "answer: Why? [length]")
        assert await finish_reason(client, "Why?", stream) == ("stop", "answer: Why?")
