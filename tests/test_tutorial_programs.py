"""Programs as DSPy's tutorials teach people to write them (tests/support/tutorials), in process: a module
with only a `forward` streams, a BestOfN whose every attempt fails ends its stream at once with the cause and
keeps no count between requests, a dev set whose rows fail scores 0 without a traceback, `--json` prints
only its line, an optional history is a history, and names stay whole and never a bundled example's."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Response, StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta, TextPart, Usage
from dspy.utils.dummies import DummyLM

from mlflow_dspy import cli
from mlflow_dspy.packaging.log import git_commit
from mlflow_dspy.program.chat import ChatProgram, parse_conversation
from mlflow_dspy.program.datasets import load_examples
from mlflow_dspy.program.mapping import ChatMapping
from mlflow_dspy.program.project import kebab_case, resolve_target
from mlflow_dspy.runtime.host import ProgramHost
from mlflow_dspy.runtime.run import Delta, Failed, Finished, Run
from mlflow_dspy.runtime.scoring import evaluate

TUTORIALS = Path(__file__).parent / "support" / "tutorials"


class StreamingEngine:
    """A sync engine that streams each answer in 3-character chunks: what a module with only a `forward`
    calls from its thread when the request streams."""

    supports_response_schema = False
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"temperature", "max_tokens", "stream"})

    def __init__(self, text: str) -> None:
        self.text = text

    def complete(self, request) -> Response:
        return Response(id="c", model="s", message=Message.assistant([TextPart(self.text)]), finish_reason="stop",
                        usage=Usage(input_tokens=2, output_tokens=3, total_tokens=5))

    def stream(self, request):
        yield StreamStartEvent(id="c", model="s")
        for start in range(0, len(self.text), 3):
            yield StreamDeltaEvent(delta=TextDelta(text=self.text[start:start + 3]))
        yield StreamEndEvent(finish_reason="stop", usage=Usage(input_tokens=2, output_tokens=3, total_tokens=5))

    def close(self) -> None:
        pass


def tutorial(name: str, monkeypatch) -> ProgramHost:
    monkeypatch.chdir(TUTORIALS)
    monkeypatch.syspath_prepend(str(TUTORIALS))
    return ProgramHost.from_program(name, "openai/unused")


async def events(run: Run) -> list:
    return [event async for event in run.events()]


def test_a_module_with_only_forward_streams_its_answer_as_the_lm_writes_it(monkeypatch):
    host = tutorial("history", monkeypatch)
    assert not hasattr(type(host.program.program), "aforward")  # the tutorial's module: forward only
    answer = "Paris is the capital of France."
    host.lm = dspy.LM("openai/streaming", engine=StreamingEngine(f"[[ ## answer ## ]]\n{answer}\n\n"
                                                                   "[[ ## completed ## ]]"), cache=False)
    run = Run(host, parse_conversation([{"role": "user", "content": "What is the capital of France?"}]),
              stream=True, timeout=30)
    seen = asyncio.run(events(run))
    deltas = [event.text for event in seen if isinstance(event, Delta) and event.field == "content"]
    assert isinstance(seen[-1], Finished), seen[-1]
    assert "".join(deltas) == answer
    assert len(deltas) > 1, "the answer arrived whole: the thread's stream did not reach the client"


def best_of_n_failing() -> ProgramHost:
    program = dspy.BestOfN(dspy.ChainOfThought("question -> answer: float"), N=2, reward_fn=lambda a, p: 1.0,
                           threshold=1.0)
    lm = DummyLM([{"reasoning": "hm", "answer": "not a number"}] * 20)
    return ProgramHost(ChatProgram(program), lm, dspy.ChatAdapter(), "best-of", "test")


@pytest.mark.parametrize("stream", [True, False])
def test_best_of_n_whose_attempts_all_fail_ends_at_once_with_the_cause_and_counts_nothing_across_requests(stream):
    host = best_of_n_failing()
    conversation = parse_conversation([{"role": "user", "content": "What is 2 + 2?"}])
    for _ in range(3):  # DSPy's BestOfN counts failures down on itself: each request must start afresh
        outcome = asyncio.run(events(Run(host, conversation, stream=stream, timeout=60)))[-1]
        assert isinstance(outcome, Failed)
        assert outcome.failure.code == "no_prediction" and "BestOfN" in outcome.failure.message
    assert host.program.program.fail_count == 2


def test_a_dev_set_whose_rows_fail_scores_them_0_and_says_why():
    program = dspy.Predict("question -> answer: float")
    examples = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in (("one", 1.0), ("two", 2.0))]
    metric = lambda example, prediction, trace=None: prediction.answer == example.answer  # noqa: E731
    some = evaluate("t", program, examples, metric, DummyLM({"one": {"answer": "1.0"}, "two": {"answer": "x"}}),
                    dspy.ChatAdapter())
    assert (some.score, some.failed) == (50.0, 1)
    assert some.rows[0]["error"] == "" and "AdapterParseError" in some.rows[1]["error"]
    every = evaluate("t", program, examples, metric, DummyLM({"one": {"answer": "?"}, "two": {"answer": "?"}}),
                     dspy.ChatAdapter())
    assert (every.score, every.failed) == (0.0, 2)


def test_eval_json_prints_its_line_alone_even_when_every_row_fails(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.py").write_text(
        "import dspy\nfrom dspy.utils.dummies import DummyLM\n\n\n"
        "def build():\n    program = dspy.Predict('question -> answer: float')\n"
        "    program.set_lm(DummyLM([{'answer': 'not a number'}] * 10))\n    return program\n")
    (tmp_path / "dev.jsonl").write_text('{"question": "one", "answer": 1.0}\n{"question": "two", "answer": 2.0}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = cli.main(["eval", "broken.py:build", "--dev", "dev.jsonl", "--lm", "openai/unused", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = out.strip().splitlines()
    result = json.loads(line)
    assert (result["dev_score"], result["examples"], result["failed"]) == (0.0, 2, 2)
    assert "2 of 2 examples failed" in err and "Traceback" not in err


def test_an_optional_history_is_the_history_and_data_rows_may_leave_it_out(monkeypatch):
    host = tutorial("history", monkeypatch)
    mapping = host.program.mapping
    assert (mapping.question_field, mapping.history_field, mapping.context_field) == ("question", "history",
                                                                                      "context")
    rows = load_examples(TUTORIALS / "data" / "history.jsonl", mapping)
    assert [row.question for row in rows][:1] == ["What is the capital of France?"]


@pytest.mark.parametrize(("text", "kebab"), [("RAG", "rag"), ("MyRAG", "my-rag"), ("HTTPServer", "http-server"),
                                             ("ChatWithHistory", "chat-with-history"), ("build_agent", "build-agent"),
                                             ("Triage", "triage")])
def test_names_keep_acronyms_whole(text, kebab):
    assert kebab_case(text) == kebab


def test_a_users_program_never_takes_a_bundled_examples_registered_name(monkeypatch):
    monkeypatch.chdir(TUTORIALS)
    assert resolve_target("tutorials.rag:RAG").model_name == "dspy-tutorials-rag"  # not the example's dspy-rag
    assert resolve_target("tutorials.classify:build").model_name == "dspy-tutorials-classify"
    assert resolve_target("rag").model_name == "dspy-tutorials-rag"  # the project's table named like an example
    assert resolve_target("entities").model_name == "dspy-entities"
    monkeypatch.chdir(TUTORIALS.parent)
    assert resolve_target("rag").model_name == "dspy-rag"  # the example itself


def test_the_git_commit_is_not_dirty_for_the_tools_own_store(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "program.py").write_text("x = 1\n")
    git("add", "program.py")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one")
    (tmp_path / "mlflow.db").write_text("store")
    (tmp_path / "mlartifacts" / "1").mkdir(parents=True)
    (tmp_path / "mlartifacts" / "1" / "model.pkl").write_text("artifact")
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "program.py").write_text("x = 2\n")
    assert git_commit(tmp_path).endswith("-dirty")


def test_the_tutorial_programs_map_to_a_chat(monkeypatch):
    monkeypatch.chdir(TUTORIALS)
    monkeypatch.syspath_prepend(str(TUTORIALS))
    from mlflow_dspy.program.target import open_target

    answers = {name: ChatMapping.of(open_target(name).module).answer_fields for name in
               ("history", "orders", "best-of", "agent", "entities", "rag", "sentiment")}
    assert answers == {"history": ("answer",), "orders": ("order",), "best-of": ("answer",), "agent": ("answer",),
                       "entities": ("entities",), "rag": ("answer",), "sentiment": ("label",)}


class CountingEngine(StreamingEngine):
    """Answers each call with the next scripted text, reporting 10 prompt and 7 completion tokens a call."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__("")
        self.texts = list(texts)

    def complete(self, request) -> Response:
        return Response(id="c", model="s", message=Message.assistant([TextPart(self.texts.pop(0))]),
                        finish_reason="length", usage=Usage(input_tokens=10, output_tokens=7, total_tokens=17))


class AsyncCounting:
    supports_response_schema = False
    supports_function_calling = False
    supports_reasoning = False
    supported_params = StreamingEngine.supported_params

    def __init__(self, sync: CountingEngine) -> None:
        self.sync = sync

    async def complete(self, request) -> Response:
        return self.sync.complete(request)

    async def stream(self, request):
        raise AssertionError("not streamed")
        yield

    async def aclose(self) -> None:
        pass


def test_an_answer_cut_short_reports_the_tokens_its_calls_used():
    """A ReAct chat cut by max_tokens answers 200 with finish_reason "length" and its real usage, not 0/0."""
    def lookup(country: str) -> str:
        """The capital of a country."""
        return "Paris"

    agent = dspy.ReAct("question -> answer", tools=[lookup], max_iters=2)
    steps = ['[[ ## next_thought ## ]]\nlook it up\n\n[[ ## next_tool_name ## ]]\nlookup\n\n'
             '[[ ## next_tool_args ## ]]\n{"country": "France"}\n\n[[ ## completed ## ]]',
             "[[ ## next_thought ## ]]\nI kno",  # the second call cut by the client's max_tokens ...
             '{"next_thought": "I kno']  # ... and DSPy's retry of it with its JSON adapter
    engine = CountingEngine(steps)
    lm = dspy.LM("openai/counting", engine=engine, async_engine=AsyncCounting(engine), cache=False)
    host = ProgramHost(ChatProgram(agent), lm, dspy.ChatAdapter(), "agent", "test")
    run = Run(host, parse_conversation([{"role": "user", "content": "Capital of France?"}]), stream=False,
              timeout=30, lm_settings={"max_tokens": 12})
    outcome = asyncio.run(run.outcome())
    assert isinstance(outcome, Finished) and outcome.cut_short and outcome.finish_reason == "length"
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (30, 21)
