"""The gateway's default executor runs DSPy's bookkeeping steps inline and everything else on threads."""

import asyncio
import threading

import pytest
from dspy.clients import execution

from mlflow_dspy.internals.dspy_executor import INLINE, BookkeepingInlineExecutor, install


def bookkeeping(name: str):
    """A stand-in with the identity of one of DSPy's inline steps (the real ones need a live LM call)."""
    def step(value):
        if value == "boom":
            raise ValueError("bookkeeping failed")
        return value, threading.get_ident()

    step.__module__, step.__name__ = "dspy.clients.execution", name
    return step


def test_the_inline_steps_are_dspys_own_functions():
    # If DSPy renames them, the fast path silently stops applying: this says so.
    for module, name in INLINE:
        assert module == execution.__name__ and callable(getattr(execution, name))


@pytest.mark.parametrize("name", ["prepare", "_price_result"])
def test_bookkeeping_runs_on_the_loop_thread_and_is_done_without_a_turn_of_the_loop(name):
    async def main():
        install()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, bookkeeping(name), 7)
        assert future.done()  # no round trip through call_soon_threadsafe
        value, thread = await asyncio.to_thread(bookkeeping(name), 8)
        return (await future), (value, thread)

    (first, first_thread), (second, second_thread) = asyncio.run(main())
    assert (first, second) == (7, 8)
    assert first_thread == second_thread == threading.get_ident()


def test_an_inline_failure_reaches_the_awaiting_coroutine():
    async def main():
        install()
        await asyncio.to_thread(bookkeeping("prepare"), "boom")

    with pytest.raises(ValueError, match="bookkeeping failed"):
        asyncio.run(main())


def test_anything_else_runs_on_a_worker_thread():
    async def main():
        install()
        return await asyncio.to_thread(threading.get_ident)

    assert asyncio.run(main()) != threading.get_ident()


def test_submitted_outside_a_loop_it_returns_a_plain_finished_future():
    with BookkeepingInlineExecutor(max_workers=1) as pool:
        future = pool.submit(bookkeeping("_price_result"), 3)
        assert future.done() and future.result()[0] == 3
