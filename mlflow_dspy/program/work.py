"""Programs that run on a thread, and the work a request leaves behind there.

A module with only a `forward` runs on a worker thread. A client that leaves
cancels its request's task, but nothing stops a thread: its program runs on,
calling the LM, until it ends. `run_in_thread` records each such thread's
future for whoever is tracking the current request (`tracking_thread_work`),
so a server can keep counting the request against its in-flight cap until
that work has actually stopped.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

Result = TypeVar("Result")

_THREAD_WORK: contextvars.ContextVar[list[Future] | None] = contextvars.ContextVar("mlflow_dspy_thread_work",
                                                                                     default=None)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    """The program threads: as many as DSPy allows async calls to use (`async_max_workers`)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import dspy

            _pool = ThreadPoolExecutor(max_workers=dspy.settings.async_max_workers,
                                       thread_name_prefix="mlflow-dspy-program")
        return _pool


async def run_in_thread(fn: Callable[..., Result], /, *args: Any, **kwargs: Any) -> Result:
    """`fn(*args, **kwargs)` on a program thread, with this task's context (DSPy's settings, the trace)."""
    context = contextvars.copy_context()
    future = _threads().submit(context.run, fn, *args, **kwargs)
    work = _THREAD_WORK.get()
    if work is not None:
        work.append(future)
    return await asyncio.wrap_future(future)


@contextmanager
def tracking_thread_work() -> Iterator[list[Future]]:
    """The futures of every thread the code inside starts through `run_in_thread`."""
    work: list[Future] = []
    token = _THREAD_WORK.set(work)
    try:
        yield work
    finally:
        _THREAD_WORK.reset(token)
