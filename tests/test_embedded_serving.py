"""The embedded model serving many users, run for real: the prompt-prefix cache never changes an answer,
concurrent requests decode together and answer as they would alone, a cancelled request frees its
sequence, and the cache is bounded and keyed so a changed program never gets another's prefix.

The programs' prompts are replayed from tests/data/embedded_requests.json (captured once from real runs;
tests/test_embedded_requests.py checks they are still what DSPy writes). Every test here runs the model but
the cache's eviction."""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from mlflow_dspy.lm_engine.embedded_settings import EmbeddedSettings
from mlflow_dspy.lm_engine.llama_engine import (
    EMBEDDED_MODEL,
    AsyncLlamaCppEngine,
    LlamaCppEngine,
    embedded_model,
    scheduler_job,
)
from mlflow_dspy.lm_engine.llama_native import ContextShape
from mlflow_dspy.lm_engine.llama_scheduler import Outcome, Scheduler
from mlflow_dspy.lm_engine.prefix_cache import PrefixCache
from tests.support import embedded_requests

SUITE_THREADS = EmbeddedSettings.from_env().threads  # tests/conftest.py sets one per model for the suite


@pytest.fixture(scope="module")
def program_requests() -> list[Request]:
    """The LM requests the four example programs make for their 24 conversations (multi-turn included), as
    the embedded engine received them in a real run: captured once (tests/support/embedded_requests.py)."""
    return embedded_requests.requests()


def _scheduler(cache_bytes: int, sequences: int = 2, queue_limit: int = 16) -> Scheduler:
    shape = ContextShape(sequences=sequences, tokens_per_sequence=2048, threads=SUITE_THREADS)
    return Scheduler(embedded_model(), shape, cache_bytes, queue_limit)


REPLAY_TOKENS = 32  # a replayed answer's first tokens: where a difference in the prompt's numbers would show


def _submit(scheduler: Scheduler, request: Request, cancel: threading.Event | None = None,
            max_tokens: int | None = None) -> queue.SimpleQueue:
    items: queue.SimpleQueue = queue.SimpleQueue()
    job = scheduler_job(scheduler.model, request, 512, items.put, cancel or threading.Event())
    if request.config.response_format:  # a program's request, replayed: its first tokens are enough
        job.max_tokens = min(job.max_tokens, max_tokens or REPLAY_TOKENS)
    scheduler.submit(job)
    return items


def _collect(items: queue.SimpleQueue) -> tuple[str, Outcome]:
    text = ""
    while True:
        item = items.get(timeout=300)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Outcome):
            return text, item
        text += item


def _answer(scheduler: Scheduler, request: Request) -> tuple[str, Outcome]:
    return _collect(_submit(scheduler, request))


def _parses_under_its_schema(request: Request, text: str, outcome: Outcome) -> bool:
    """An answer that ended (not one cut at its token limit) is JSON with the schema's fields."""
    if outcome.finish_reason == "length":
        return True
    schema = (request.config.response_format or {}).get("schema")
    if not schema:
        return True
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(schema.get("required", [])) <= set(value)


@pytest.mark.embedded
def test_greedy_answers_are_identical_with_the_prefix_cache_on_and_off(program_requests):
    multi_turn = [r for r in program_requests if len(r.messages) > 1 or "history" in (r.system or "")]
    assert multi_turn, "the captured requests include multi-turn conversations"
    off, on = _scheduler(cache_bytes=0), _scheduler(cache_bytes=64 << 20)
    try:
        without = [_answer(off, request) for request in program_requests]
        with_cache = [_answer(on, request) for request in program_requests]
        stats = on.stats().cache
    finally:
        off.close()
        on.close()
    assert [text for text, _ in with_cache] == [text for text, _ in without]
    assert [o.completion_tokens for _, o in with_cache] == [o.completion_tokens for _, o in without]
    # The cache was really used: each program's prefix evaluated once, then restored.
    restored = sum(outcome.prefix_cached for _, outcome in with_cache)
    assert stats["hits"] == restored >= len(program_requests) - len(embedded_requests.CONVERSATIONS) - 2
    assert stats["entries"] >= len(embedded_requests.CONVERSATIONS)
    assert all(_parses_under_its_schema(r, text, o) for r, (text, o) in zip(program_requests, with_cache, strict=True))
    assert sum(o.finish_reason == "length" for _, o in with_cache) <= len(program_requests) // 4


@pytest.mark.embedded
def test_concurrent_answers_are_those_given_one_at_a_time(program_requests):
    requests = program_requests[:12]
    scheduler = _scheduler(cache_bytes=64 << 20, sequences=4)
    try:
        alone = [_answer(scheduler, request) for request in requests]
        steps_before = scheduler.stats()
        pending = [_submit(scheduler, request) for request in requests]  # 4 decode together, 8 wait their turn
        together = [_collect(items) for items in pending]
        steps_after = scheduler.stats()
    finally:
        scheduler.close()
    batched_rows = steps_after.rows - steps_before.rows
    batched_steps = steps_after.steps - steps_before.steps
    assert batched_rows / batched_steps > 2, "requests were decoded together, several per llama_decode"
    identical = sum(a[0] == b[0] for a, b in zip(alone, together, strict=True))
    print(f"concurrent vs one at a time: {identical} of {len(requests)} identical")
    # Each sequence has a KV stream of its own, so no answer depends on who else is in the batch.
    assert identical == len(requests)
    assert all(_parses_under_its_schema(r, *answer) for r, answer in zip(requests, together, strict=True))


def _long_request(text: str, max_tokens: int) -> Request:
    return Request(model=EMBEDDED_MODEL, messages=(Message.user(text),),
                   config=Config(max_tokens=max_tokens, temperature=0.0))


@pytest.mark.embedded
def test_cancelling_mid_batch_frees_its_sequence_and_the_others_finish():
    scheduler = _scheduler(cache_bytes=0, sequences=2, queue_limit=4)
    try:
        stay = _submit(scheduler, _long_request("Write a long story about the sea.", 120))
        cancel = threading.Event()
        leave = _submit(scheduler, _long_request("Write a long story about a mountain.", 400), cancel)
        assert isinstance(leave.get(timeout=120), str)  # both are decoding now
        assert isinstance(stay.get(timeout=120), str)
        third = _submit(scheduler, _long_request("Say hello.", 8))  # no sequence free: it waits
        time.sleep(0.3)
        assert scheduler.stats().waiting == 1
        cancel.set()
        _, left = _collect(leave)
        assert left.completion_tokens < 400  # it stopped where it was cancelled
        text, outcome = _collect(third)  # served in the sequence the cancelled request freed...
        assert outcome.completion_tokens > 0 and text
        assert scheduler.stats().running == 1  # ...while the other is still decoding
        _, finished = _collect(stay)
        assert finished.finish_reason == "length" and finished.completion_tokens == 120
        stats = scheduler.stats()
        assert stats.running == 0 and stats.waiting == 0
    finally:
        scheduler.close()


@pytest.mark.embedded
def test_a_full_queue_refuses_at_once_and_serves_again_after():
    from mlflow_dspy.lm_engine.llama_scheduler import QueueFull

    scheduler = _scheduler(cache_bytes=0, sequences=1, queue_limit=1)
    try:
        first = _submit(scheduler, _long_request("Write a long story about the sea.", 60))
        second = _submit(scheduler, _long_request("Say hi.", 4))  # waits
        with pytest.raises(QueueFull, match="busy"):
            _submit(scheduler, _long_request("Say hi.", 4))
        assert _collect(first)[1].completion_tokens == 60
        assert _collect(second)[1].completion_tokens > 0
        assert _answer(scheduler, _long_request("Say hi.", 4))[1].completion_tokens > 0
    finally:
        scheduler.close()


@pytest.mark.embedded
def test_a_full_queue_reaches_dspy_as_a_rate_limit_to_retry_later(monkeypatch):
    from dspy.utils.exceptions import LMError

    from mlflow_dspy.program.failures import failure_of

    monkeypatch.setenv("MLFLOW_DSPY_EMBEDDED_QUEUE", "0")
    engine = LlamaCppEngine(n_ctx=1024)  # a runtime of its own, with the setting above
    lm = dspy.LM(EMBEDDED_MODEL, engine=engine, async_engine=AsyncLlamaCppEngine(engine), cache=False)
    from mlflow_dspy.lm_engine.llama_engine import embedded_runtime

    sequences = embedded_runtime(1024).scheduler.context.shape.sequences

    async def scenario() -> BaseException:
        busy = [asyncio.create_task(lm.acall(f"Write a long story number {i}.", max_tokens=200))
                for i in range(sequences)]
        await asyncio.sleep(1.0)
        try:
            await lm.acall("Say hi.", max_tokens=4)
        except BaseException as exc:
            return exc
        finally:
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        raise AssertionError("a request beyond the sequences and the queue was accepted")

    try:
        error = asyncio.run(scenario())
    finally:
        from mlflow_dspy.lm_engine import llama_engine

        llama_engine._runtimes.pop(1024).scheduler.close()  # the queue-0 runtime is this test's alone
    assert isinstance(error, LMError)
    failure = failure_of(error)
    assert failure is not None and (failure.status, failure.code, failure.retry_after) == (429, "model_busy", 1)
    assert "busy" in failure.message


def test_eviction_keeps_the_cache_within_its_limit():
    cache = PrefixCache(limit_bytes=250)
    cache.put([1, 2], b"a" * 100)
    cache.put([3, 4], b"b" * 100)
    assert cache.get([1, 2]) == b"a" * 100  # now the most recently used
    cache.put([5, 6], b"c" * 100)  # over the limit: the least recently used ([3, 4]) goes
    assert [3, 4] not in cache and [1, 2] in cache and [5, 6] in cache
    cache.put([7], b"d" * 1000)  # larger than the whole cache: never kept
    stats = cache.stats()
    assert stats.bytes == 200 <= cache.limit_bytes
    assert (stats.entries, stats.evictions) == (2, 1)


@pytest.mark.embedded
def test_a_small_cache_evicts_and_still_answers_as_without_it(program_requests):
    by_system: dict[str, Request] = {}
    for request in program_requests:
        by_system.setdefault(request.system or "", request)
    requests = list(by_system.values())[:3] * 2  # three programs, twice over
    off = _scheduler(cache_bytes=0)
    small = _scheduler(cache_bytes=5 << 20)  # room for about one program's prefix
    try:
        expected = [_answer(off, r)[0] for r in requests]
        got = [_answer(small, r)[0] for r in requests]
        stats = small.stats().cache
    finally:
        off.close()
        small.close()
    assert got == expected
    assert stats["evictions"] >= 2 and stats["bytes"] <= 5 << 20 and stats["entries"] == 1


@pytest.mark.embedded
def test_a_changed_program_never_gets_the_old_versions_prefix(program_requests):
    original = next(r for r in program_requests if r.system)
    changed = Request(model=original.model, system=original.system.replace("your objective is", "your goal is"),
                      messages=original.messages, config=original.config)
    assert changed.system != original.system
    off, on = _scheduler(cache_bytes=0), _scheduler(cache_bytes=64 << 20)
    try:
        expected = [_answer(off, r)[0] for r in (original, changed)]
        first = _answer(on, original)
        new_version = _answer(on, changed)
        again = _answer(on, original)
        stats = on.stats().cache
    finally:
        off.close()
        on.close()
    assert not new_version[1].prefix_cached  # the new version's prefix is evaluated, not the old one restored
    assert again[1].prefix_cached
    assert [first[0], new_version[0]] == expected and again[0] == expected[0]
    assert stats["entries"] == 2


@pytest.mark.embedded
def test_checking_the_sampled_token_first_gives_the_tokens_of_a_full_grammar_pass(program_requests):
    import dataclasses

    scheduler = _scheduler(cache_bytes=64 << 20)
    requests = [r for r in program_requests if r.config.response_format][:6]
    assert len(requests) == 6
    try:
        checked, passes_checked = [], 0
        full, passes_full = [], 0
        for request in requests:
            before = scheduler.stats().grammar_passes
            checked.append(_answer(scheduler, request)[0])
            passes_checked += scheduler.stats().grammar_passes - before
            items: queue.SimpleQueue = queue.SimpleQueue()
            job = scheduler_job(scheduler.model, request, 512, items.put, threading.Event())
            job.sampling = dataclasses.replace(job.sampling, grammar_first=True)
            job.max_tokens = REPLAY_TOKENS
            before = scheduler.stats()
            scheduler.submit(job)
            full.append(_collect(items)[0])
            after = scheduler.stats()
            passes_full += after.grammar_passes - before.grammar_passes
            assert after.grammar_passes - before.grammar_passes == after.tokens - before.tokens
    finally:
        scheduler.close()
    assert checked == full
    assert passes_checked < passes_full / 3  # most sampled tokens already fit the grammar


@pytest.mark.embedded
def test_a_failing_batch_step_fails_its_requests_and_the_next_one_is_served(monkeypatch):
    scheduler = _scheduler(cache_bytes=0)
    original = Scheduler._advance
    broken = {"once": True}

    def advance(self, running, row):
        if broken.pop("once", False):
            raise RuntimeError("a bug in a step")
        return original(self, running, row)

    monkeypatch.setattr(Scheduler, "_advance", advance)
    try:
        with pytest.raises(RuntimeError, match="a bug in a step"):
            _answer(scheduler, _long_request("Say hi.", 8))
        text, outcome = _answer(scheduler, _long_request("Say hi.", 8))
        assert text and outcome.completion_tokens > 0
        assert scheduler.stats().running == 0
    finally:
        scheduler.close()


@pytest.mark.embedded
def test_a_prefix_state_llama_cpp_refuses_is_evaluated_instead(program_requests):
    request = next(r for r in program_requests if r.system)
    off, on = _scheduler(cache_bytes=0), _scheduler(cache_bytes=64 << 20)
    try:
        expected = _answer(off, request)[0]
        _answer(on, request)  # caches the prefix
        prefix = next(iter(on.cache._states))
        on.cache.put(prefix, b"not a state")
        text, outcome = _answer(on, request)
    finally:
        off.close()
        on.close()
    assert text == expected and not outcome.prefix_cached


@pytest.mark.embedded
def test_greedy_answers_are_llama_cpp_pythons_own_for_the_same_prompt_and_grammar(program_requests):
    """The engine's prompt, grammar and sampling are `Llama.create_chat_completion`'s: same tokens out."""
    from llama_cpp import Llama

    from bench.embedded import raw_kwargs
    from mlflow_dspy.lm_engine.gguf import locate_gguf
    from mlflow_dspy.lm_engine.messages import chat_messages

    requests = [r for r in program_requests if r.config.response_format][::6][:4]
    raw = Llama(model_path=str(locate_gguf()), n_ctx=2048, n_threads=SUITE_THREADS, verbose=False)
    scheduler = _scheduler(cache_bytes=64 << 20)
    try:
        expected = []
        for request in requests:
            raw.reset()
            completion = raw.create_chat_completion(messages=chat_messages(request), **raw_kwargs(request))
            expected.append(completion["choices"][0]["message"]["content"])
        got = [_collect(_submit(scheduler, request, max_tokens=request.config.max_tokens))[0] for request in requests]
    finally:
        scheduler.close()
        raw.close()
    assert got == expected


@pytest.mark.embedded
def test_a_waiting_request_that_is_cancelled_gives_up_its_place_in_the_queue():
    from mlflow_dspy.lm_engine.llama_scheduler import QueueFull

    scheduler = _scheduler(cache_bytes=0, sequences=1, queue_limit=1)
    try:
        first = _submit(scheduler, _long_request("Write a long story about the sea.", 60))
        assert isinstance(first.get(timeout=120), str)
        gave_up = threading.Event()
        waiting = _submit(scheduler, _long_request("Say hi.", 4), gave_up)
        with pytest.raises(QueueFull):
            _submit(scheduler, _long_request("Say hi.", 4))
        gave_up.set()  # its caller left
        second = _submit(scheduler, _long_request("Say hi.", 4))  # takes the place
        assert _collect(waiting)[1].completion_tokens == 0
        assert _collect(second)[1].completion_tokens > 0
        _collect(first)
    finally:
        scheduler.close()


@pytest.mark.embedded
def test_a_long_prompt_is_evaluated_a_batch_at_a_time_while_others_stream():
    scheduler = _scheduler(cache_bytes=0, sequences=2)
    try:
        streaming = _submit(scheduler, _long_request("Write a long story about the sea.", 200))
        assert isinstance(streaming.get(timeout=120), str)
        long_prompt = _long_request("Summarize this. " + "The tide came in and went out again. " * 180, 4)
        arrived_before = 0
        late = _submit(scheduler, long_prompt)
        while not streaming.empty():  # what came before; at most one more token comes before it is admitted
            streaming.get_nowait()
        first_of_late = late.get(timeout=300)
        assert isinstance(first_of_late, str), first_of_late
        while True:  # what the running stream got while the long prompt (several batches) was evaluated
            try:
                item = streaming.get_nowait()
            except queue.Empty:
                break
            arrived_before += isinstance(item, str)
        _collect(late)
        _collect(streaming)
    finally:
        scheduler.close()
    batches = math.ceil(len(embedded_model().tokenize(long_prompt.messages[0].text, False)) / 512)
    assert batches >= 3
    # A decode step after each of the long prompt's batches but its last (all at once would allow at most
    # the one token that may come before it is admitted).
    assert arrived_before >= batches - 1, "the running stream kept getting tokens between the long prompt's batches"


@pytest.mark.embedded
def test_a_request_that_ends_on_its_first_token_leaves_the_others_decoding():
    scheduler = _scheduler(cache_bytes=0, sequences=2)
    try:
        streaming = _submit(scheduler, _long_request("Write a long story about the sea.", 60))
        assert isinstance(streaming.get(timeout=120), str)
        for _ in range(3):
            _, outcome = _collect(_submit(scheduler, _long_request("Say hi.", 1)))
            assert outcome.completion_tokens <= 1 and outcome.finish_reason in ("length", "stop")
        _, finished = _collect(streaming)  # no error: the finished one never reached a decode step
        assert finished.completion_tokens == 60
    finally:
        scheduler.close()


@pytest.mark.embedded
def test_stop_strings_cut_at_the_earliest_one_and_long_tokens_keep_their_text():
    from mlflow_dspy.lm_engine.llama_scheduler import _Text

    text = _Text(("\n\n", "###"))
    assert text.add(b"a#") + text.add(b"##\n\nb") == "a" and text.stopped
    split = _Text(("END",))
    assert split.add(b"hello E") + split.add(b"N") + split.add(b"D more") == "hello " and split.stopped
    held = _Text(("END",))
    assert held.add(b"hello E") + held.add(b"x") + held.rest() == "hello Ex"
    model = embedded_model()
    longest = max(range(model.n_vocab), key=lambda token: len(model.token_text(token)))
    assert len(model.piece(longest)) > 64
