"""Programs that run on a thread, and the work a request leaves behind there.

A module with only a `forward` runs on a worker thread: one of AnyIO's, as
`dspy.asyncify` does, because DSPy's sync streaming path hands each LM chunk
back to the event loop with `anyio.from_thread.run`, which works only from a
thread AnyIO owns (a plain thread pool made every such stream fail with
"Not running inside an AnyIO worker thread"). A client that leaves cancels
its request's task, but nothing stops a thread: its program runs on, calling
the LM, until it ends. `run_in_thread` records a future of each such thread's
work for whoever is tracking the current request (`tracking_thread_work`), so
a server can keep counting the request against its in-flight cap until that
work has actually stopped.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

Result = TypeVar("Result")

_THREAD_WORK: contextvars.ContextVar[list[Future] | None] = contextvars.ContextVar("mlflow_dspy_thread_work",
                                                                                     default=None)
_limiter: anyio.CapacityLimiter | None = None


def _threads() -> anyio.CapacityLimiter:
    """The program threads' limit: as many as DSPy allows async calls to use (`async_max_workers`)."""
    global _limiter
    import dspy

    if _limiter is None:
        _limiter = anyio.CapacityLimiter(dspy.settings.async_max_workers)
    return _limiter


async def run_in_thread(fn: Callable[..., Result], /, *args: Any, **kwargs: Any) -> Result:
    """`fn(*args, **kwargs)` on one of AnyIO's worker threads, with this task's context (DSPy's settings, the
    trace); a caller that is cancelled leaves it running, and its work is tracked until it ends."""
    done: Future = Future()
    work = _THREAD_WORK.get()
    if work is not None:
        work.append(done)

    def tracked() -> Result | None:
        if not done.set_running_or_notify_cancel():
            return None  # the caller went away before a thread took it: it never runs
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            done.set_exception(exc)
            raise
        done.set_result(result)
        return result

    try:
        return await anyio.to_thread.run_sync(tracked, abandon_on_cancel=True, limiter=_threads())
    finally:
        done.cancel()  # a no-op once started; before, it keeps it from starting: nothing is left behind


@contextmanager
def tracking_thread_work() -> Iterator[list[Future]]:
    """The futures of every thread the code inside starts through `run_in_thread`."""
    work: list[Future] = []
    token = _THREAD_WORK.set(work)
    try:
        yield work
    finally:
        _THREAD_WORK.reset(token)
