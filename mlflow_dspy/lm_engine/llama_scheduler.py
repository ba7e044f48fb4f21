"""Continuous batching for the embedded model: many requests, one llama context.

One thread owns the context. Each turn it admits waiting requests into free
sequences (restoring a cached prompt prefix, or evaluating it), evaluates up
to one batch of the admitted prompts' remaining tokens, then runs one
`llama_decode` over the next token of every running sequence, samples each
with its own sampler chain and grammar, and hands each its text. A request
that finishes or is cancelled leaves the batch at the next turn and frees its
sequence (one still waiting gives up its place at once); a request beyond
the sequences waits in a bounded queue.

Each answer is bounded as it is sampled (`answer_bounds`): free text that loops
stops, JSON that loops is closed where it is and goes on, and JSON that comes
near its budget (max_tokens) is closed as a whole, so that it parses. Such an
answer finishes "length", its usage the tokens really sampled.

Answers do not depend on the prefix cache: a prompt is always evaluated as
its prefix (a batch of its own, into an empty sequence) and then the rest,
whether the prefix is restored or computed. Each sequence has a KV stream of
its own, so its attention reads only its own tokens; how the rest of a
prompt is cut into batches does depend on who else is admitted with it, and
the tests found that did not change an answer (12 of 12), which is an
observation on this build and CPU, not a guarantee.
"""

from __future__ import annotations

import codecs
import heapq
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow_dspy.lm_engine.answer_bounds import (
    CLOSING_LIMIT,
    Closing,
    ClosingPlan,
    JsonLevel,
    Repetition,
    RepetitionLimit,
)
from mlflow_dspy.lm_engine.llama_native import (
    ContextShape,
    NativeContext,
    NativeError,
    NativeModel,
    SamplerChain,
    Sampling,
)
from mlflow_dspy.lm_engine.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

_DIGITS = re.compile(rb"[0-9]+")


class QueueFull(RuntimeError):
    """Every sequence is busy and the waiting line is full."""


class PromptTooLong(ValueError):
    """A prompt that does not fit one sequence's context."""


@dataclass
class Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_cached: bool = False
    loops_stopped: int = 0  # repeated spans the repetition guard cut (the answer then finishes "length")
    closed_at_budget: bool = False  # JSON closed as it came near max_tokens (the answer then finishes "length")


@dataclass
class Job:
    """One generation: the prompt's tokens (its first `prefix` are the program's fixed part), how to
    sample, and where its text goes (`deliver` gets str pieces, then an Outcome or an exception)."""

    prompt: Sequence[int]
    prefix: int
    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...]
    deliver: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    # Under a grammar: what closing the answer would still write; once that is all `max_tokens` leaves, the
    # answer is closed (`Closing`), so that it parses within `max_tokens`. None: it is cut at `max_tokens`.
    closing: ClosingPlan | None = None


class _Text:
    """Sampled bytes to text: whole UTF-8 characters only, stop strings cut and never shown."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._shown = 0
        self.stopped = False

    def add(self, piece: bytes) -> str:
        self._text += self._decoder.decode(piece)
        if not self._stops:
            return self._take(len(self._text))
        found = [at for stop in self._stops if (at := self._text.find(stop, max(0, self._shown - len(stop) + 1))) != -1]
        if found:
            self.stopped = True
            return self._take(min(found))  # the earliest stop in the text, whichever it is
        return self._take(len(self._text) - self._held())

    def _held(self) -> int:
        # The longest end of the text that could still grow into a stop string.
        tail = self._text[self._shown:]
        for size in range(min(len(tail), max(len(s) for s in self._stops) - 1), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stops):
                return size
        return 0

    @property
    def written(self) -> str:
        """Everything decoded so far, a stop string's beginning held back included."""
        return self._text

    def _take(self, end: int) -> str:
        piece = self._text[self._shown:end] if end > self._shown else ""
        self._shown = max(self._shown, end)
        return piece

    def rest(self) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.decode(b"", final=True)
        return self._take(len(self._text))


class _Running:
    def __init__(self, job: Job, seq: int, repetition: RepetitionLimit) -> None:
        self.job = job
        self.seq = seq
        self.sampler: SamplerChain | None = None
        self.text = _Text(job.stops)
        self.outcome = Outcome(prompt_tokens=len(job.prompt))
        self.n_past = 0
        self.next_token = -1
        self.done = False
        self.repetition = Repetition(repetition)
        # Under a grammar (JSON): its level, the level each token went down to, and its closing if it is
        # being closed.
        self.json = JsonLevel() if job.sampling.grammar is not None else None
        self.lows: deque[int] = deque(maxlen=repetition.max_period)
        self.closing: Closing | None = None


@dataclass
class SchedulerStats:
    sequences: int
    queue_limit: int
    running: int
    waiting: int
    steps: int
    rows: int
    tokens: int
    grammar_passes: int
    prompt_seconds: float
    decode_seconds: float
    cache: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Scheduler:
    """The embedded model's only user of its llama context."""

    def __init__(self, model: NativeModel, shape: ContextShape, cache_bytes: int, queue_limit: int,
                 repetition: RepetitionLimit | None = None) -> None:
        self.model = model
        self.repetition = repetition or RepetitionLimit()
        self._closers: list[tuple[int, bytes]] | None = None  # tokens that only close JSON, found on first use
        self._shapes: dict[int, int] = {}  # token -> the id of its shape (the repetition guard's counts)
        self._shape_ids: dict[bytes, int] = {}
        self.context = NativeContext(model, shape)
        self.cache = PrefixCache(cache_bytes)
        self.queue_limit = max(0, queue_limit)
        self.tokens_per_sequence = self.context.tokens_per_sequence
        # The lowest free sequence id is given out first: llama.cpp evaluates the sequences of one step
        # in a single pass when their ids run in order (with a KV stream per sequence).
        self._free = list(range(shape.sequences))
        self._waiting: deque[Job] = deque()
        self._prefilling: list[_Running] = []  # admitted, prompt still being evaluated (in admission order)
        self._running: list[_Running] = []  # decoding
        self._cond = threading.Condition()
        self._closed = False
        self._steps = self._rows = self._tokens = self._grammar_passes = 0
        self._prompt_seconds = self._decode_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    # -- callers' side -----------------------------------------------------
    def submit(self, job: Job) -> None:
        if len(job.prompt) >= self.tokens_per_sequence:
            raise PromptTooLong(f"Requested tokens ({len(job.prompt)}) exceed context window of "
                                f"{self.tokens_per_sequence}")
        if not 0 <= job.prefix < len(job.prompt):
            raise ValueError(f"a prompt's prefix must be shorter than the prompt ({job.prefix} of {len(job.prompt)})")
        dropped: list[Job] = []
        try:
            with self._cond:
                if self._closed:
                    raise RuntimeError("the embedded model has been closed")
                dropped = self._drop_cancelled_waiters()
                # The free sequences take the first waiters; past them, `queue_limit` may wait.
                if len(self._waiting) >= self.queue_limit + len(self._free):
                    raise QueueFull(f"the embedded model is busy: all {self.context.shape.sequences} of its "
                                    f"sequences are answering and {len(self._waiting)} more requests are waiting")
                self._waiting.append(job)
                self._cond.notify()
        finally:
            self._deliver_dropped(dropped)

    def _drop_cancelled_waiters(self) -> list[Job]:
        """Take the waiters whose callers left out of the line (they hold no place in it); under the lock."""
        dropped = [job for job in self._waiting if job.cancel.is_set()]
        if dropped:
            self._waiting = deque(job for job in self._waiting if not job.cancel.is_set())
        return dropped

    def _deliver_dropped(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._deliver(job, Outcome(prompt_tokens=len(job.prompt)))

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                sequences=self.context.shape.sequences, queue_limit=self.queue_limit,
                running=sum(not r.done for r in (*self._running, *self._prefilling)),
                waiting=len(self._waiting), steps=self._steps, rows=self._rows, tokens=self._tokens,
                grammar_passes=self._grammar_passes, prompt_seconds=round(self._prompt_seconds, 4),
                decode_seconds=round(self._decode_seconds, 4), cache=self.cache.stats().as_dict())

    def close(self) -> bool:
        """Stop the batch thread (its requests fail) and free the context; False if the thread did not
        stop in time, in which case nothing it uses is freed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return False
        self.context.close()
        return True

    # -- the batch thread ----------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running and not self._prefilling:
                    self._cond.wait()
                if self._closed:
                    break
                dropped = self._drop_cancelled_waiters()
                admitted = []
                while self._waiting and self._free:
                    admitted.append(_Running(self._waiting.popleft(), heapq.heappop(self._free), self.repetition))
            self._deliver_dropped(dropped)
            try:
                self._turn(admitted)
            except Exception as exc:  # a bug must fail its requests, not leave every caller waiting forever
                log.exception("embedded model: the batch step failed")
                for running in [*admitted, *self._prefilling, *self._running]:
                    self._fail(running, exc)
                self._prune()
        self._shutdown()

    def _turn(self, admitted: list[_Running]) -> None:
        """One turn: the newly admitted get their prefix, one batch of prompt rows is evaluated (so a long
        prompt never holds the others' streams for more than a batch), then one decode step for all."""
        for running in admitted:
            if self._prepare(running):
                running.n_past = running.job.prefix
                self._prefilling.append(running)
        for running in [*self._prefilling, *self._running]:
            if running.job.cancel.is_set():
                self._finish(running, "stop")
        self._prune()
        if self._prefilling:
            self._prefill()
        if self._running:
            self._step()

    def _deliver(self, job: Job, item: Any) -> None:
        try:
            job.deliver(item)
        except Exception:  # a consumer that went away must not stop the batch
            job.cancel.set()

    def _prefill(self) -> None:
        """Evaluate up to one batch of the waiting prompt rows (first admitted first, each sequence's rows
        together and in sequence order), and sample the first token of each prompt that ends in it."""
        began = time.perf_counter()
        room = self.context.shape.batch
        taken: list[tuple[_Running, int]] = []
        for running in self._prefilling:
            if room == 0:
                break
            count = min(room, len(running.job.prompt) - running.n_past)
            taken.append((running, count))
            room -= count
        rows: list[tuple[int, int, int, bool]] = []
        ending: list[tuple[int, _Running]] = []
        for running, count in sorted(taken, key=lambda pair: pair[0].seq):
            prompt, start = running.job.prompt, running.n_past
            for pos in range(start, start + count):
                last = pos == len(prompt) - 1
                rows.append((prompt[pos], pos, running.seq, last))
                if last:
                    ending.append((len(rows) - 1, running))
        try:
            self.context.decode(rows)
        except NativeError as exc:
            for running, _ in taken:
                self._fail(running, exc)
            self._prune()
            return
        finally:
            self._prompt_seconds += time.perf_counter() - began
        for running, count in taken:
            running.n_past += count
        self._prefilling = [running for running in self._prefilling if running.n_past < len(running.job.prompt)]
        self._running += [running for _, running in ending]  # all in place first: a failure below fails them all
        for row, running in ending:
            self._advance(running, row)
        self._prune()  # one that ended on its first token must not reach the decode step

    def _prepare(self, running: _Running) -> bool:
        """A clean sequence holding the job's fixed prefix (restored from the cache when it is there)."""
        job, seq, context = running.job, running.seq, self.context
        try:
            running.sampler = SamplerChain(self.model, job.sampling)
            context.clear(seq)
            prefix = list(job.prompt[:job.prefix])
            if prefix:
                state = self.cache.get(prefix) if self.cache.enabled else None
                if state is not None and self._restored(seq, state):
                    running.outcome.prefix_cached = True
                else:
                    context.evaluate(prefix, 0, seq, last_logits=False)
                    if self.cache.enabled:
                        self.cache.put(prefix, context.save(seq))
        except (NativeError, ValueError) as exc:
            self._fail(running, exc)
            return False
        return True

    def _restored(self, seq: int, state: bytes) -> bool:
        try:
            self.context.restore(seq, state)
        except NativeError:
            log.warning("embedded model: a saved prefix could not be restored; evaluating it instead")
            return False
        return True

    def _step(self) -> None:
        # In sequence order: one pass (see _free). Only the live: a finished sequence has been cleared.
        batch = sorted((r for r in self._running if not r.done), key=lambda running: running.seq)
        began = time.perf_counter()
        try:
            self.context.decode([(r.next_token, r.n_past, r.seq, True) for r in batch])
        except NativeError as exc:
            log.warning("embedded model: a decode step failed (%s); its %d requests fail", exc, len(batch))
            for running in batch:
                self._fail(running, exc)
            self._prune()
            return
        self._steps += 1
        self._rows += len(batch)
        for row, running in enumerate(batch):
            running.n_past += 1
            self._advance(running, row)
        self._decode_seconds += time.perf_counter() - began
        self._prune()

    def _advance(self, running: _Running, row: int) -> None:
        """Sample the sequence's next token from its logits at `row`, and hand its text over."""
        sampler = running.sampler
        assert sampler is not None
        passes = sampler.grammar_passes
        token = self._closing_token(running, row) if running.closing is not None else None
        if token is None:
            token = sampler.sample(self.context, row)
        self._grammar_passes += sampler.grammar_passes - passes
        self._tokens += 1
        if self.model.is_end(token):
            self._finish(running, "stop")
            return
        running.outcome.completion_tokens += 1
        raw = self.model.piece(token)
        piece = running.text.add(raw)
        if piece:
            self._deliver(running.job, piece)
        if running.text.stopped:
            self._finish(running, "stop")
        elif running.outcome.completion_tokens >= running.job.max_tokens or \
                running.n_past + 1 >= self.tokens_per_sequence or not self._guarded(running, token, raw):
            self._finish(running, "length")
        else:
            running.next_token = token

    # -- the repetition guard and the budget ---------------------------------------------------------------
    def _guarded(self, running: _Running, token: int, raw: bytes) -> bool:
        """Watch for a loop and for the end of the budget; False when the sequence must stop here.

        Free text that loops stops at once. JSON (a grammar) that loops is closed instead: the model finishes
        the item or member it is in (within `CLOSING_LIMIT` tokens), then the engine writes the tokens that
        close what the loop was in (the string, or the list or object whose members repeat) as far as the
        grammar allows, and the model goes on with what the schema still asks for (the next field), so the
        answer parses with what was written. JSON whose budget (max_tokens) comes down to what closing it
        would still write (`ClosingPlan`) is closed as a whole, at once: each string ends where it is, each
        list and object as soon as the grammar allows, and what the schema still requires is written as
        short as the model will.
        """
        period = running.repetition.add(token, self._shape(token, raw))
        json = running.json
        if json is None:
            if period:
                running.outcome.loops_stopped += 1
            return not period
        running.lows.append(json.feed(raw))
        closing = running.closing
        if closing is not None:
            closing.tokens += 1
            if json.level < closing.below:
                running.closing = closing = None
                running.repetition.reset()
            elif closing.finish_item and closing.tokens >= CLOSING_LIMIT:
                closing.finish_item = False
        if closing is None and period:
            running.outcome.loops_stopped += 1
            # What the loop was in: the lowest level its span went down to (a list's items repeating pass
            # between them at the list's own level; a sentence repeating inside a string stays in it).
            below = min(list(running.lows)[-period:])
            if below <= 0:
                return False
            running.closing = closing = Closing(below, finish_item=True)
        plan, left = running.job.closing, running.job.max_tokens - running.outcome.completion_tokens
        if plan is not None and left <= plan.reserve and json.level > 0 \
                and (closing is None or closing.finish_item or closing.below > 1) \
                and left <= plan.room(running.text.written):
            running.closing = Closing(1, finish_item=False)
            running.outcome.closed_at_budget = True
        return True

    def _shape(self, token: int, raw: bytes) -> int:
        """The id of a token's shape: its text with each run of digits as one mark."""
        shape = self._shapes.get(token)
        if shape is None:
            shape = self._shapes[token] = self._shape_ids.setdefault(_DIGITS.sub(b"0", raw), len(self._shape_ids))
        return shape

    def _closing_token(self, running: _Running, row: int) -> int | None:
        """While JSON is being closed: the model's own token while it finishes the item or member it is in
        (but not one that goes on past its end), then the token that closes the most of what is open and
        the grammar allows (the model's likeliest among equals). None when the grammar allows no such token
        here (the model writes the next one: a colon, the next field's name, ...)."""
        json, closing, sampler = running.json, running.closing, running.sampler
        assert json is not None and closing is not None and sampler is not None
        if closing.finish_item and json.level > closing.below:
            below = closing.below
            token = sampler.sample_unless(self.context, row, lambda t: json.overruns(self.model.piece(t), below))
            if token is not None:
                return token
        candidates = []
        for token, text in self._closing_tokens():
            # In a string: a token that starts by ending it and opens no other; outside: one that opens none.
            usable = text[0] == 0x22 and text.count(0x22) == 1 if json.in_string else 0x22 not in text
            if usable:
                closes = sum(text.count(c) for c in (0x22, 0x5D, 0x7D))
                candidates.append((-closes, -self.context.logit(row, token), token))
        candidates.sort()
        return sampler.forced(self.context, row, [token for *_, token in candidates])

    def _closing_tokens(self) -> list[tuple[int, bytes]]:
        """The vocabulary's tokens made only of quotes, closing brackets and braces, and spaces."""
        if self._closers is None:
            closing = set(b'"]} ')
            found = []
            for token in range(self.model.n_vocab):
                if self.model.is_end(token):
                    continue
                text = self.model.piece(token)
                if text and set(text) <= closing and text.strip():
                    found.append((token, text))
            self._closers = found
        return self._closers

    def _release(self, running: _Running) -> None:
        running.done = True
        if running.sampler is not None:
            running.sampler.close()
            running.sampler = None
        self.context.clear(running.seq)
        with self._cond:
            heapq.heappush(self._free, running.seq)

    def _finish(self, running: _Running, reason: str) -> None:
        if running.done:
            return
        tail = running.text.rest()
        if tail:
            self._deliver(running.job, tail)
        # An answer the repetition guard or the budget cut is cut short, whatever ended it.
        outcome = running.outcome
        running.outcome.finish_reason = "length" if outcome.loops_stopped or outcome.closed_at_budget else reason
        self._release(running)
        self._deliver(running.job, running.outcome)

    def _fail(self, running: _Running, exc: BaseException) -> None:
        if running.done:
            return
        self._release(running)
        self._deliver(running.job, exc)

    def _prune(self) -> None:
        self._running = [r for r in self._running if not r.done]
        self._prefilling = [r for r in self._prefilling if not r.done]

    def _shutdown(self) -> None:
        closed = RuntimeError("the embedded model has been closed")
        for running in [*self._prefilling, *self._running]:
            self._fail(running, closed)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            self._deliver(job, closed)
