"""One deadline over an async stream, for the LM's stream and the gateway's alike; a deadline that can be
brought forward while work waits on it (a server that stops gives its runs less time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """A loop time by which work must end. `bring_forward` moves it earlier, and every wait on it (`waiting`)
    then ends at the new time, with the TimeoutError the original one would have raised; `moved` says so."""

    __slots__ = ("_waits", "moved", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.moved = False
        self._waits: set[asyncio.Timeout] = set()

    def waiting(self) -> _Wait:
        """An `async with` that raises TimeoutError at the deadline, wherever it is by then."""
        return _Wait(self)

    def bring_forward(self, when: float) -> None:
        """End by loop time `when`, if that is earlier than the deadline now."""
        if when >= self.when:
            return
        self.when, self.moved = when, True
        for timeout in list(self._waits):
            with contextlib.suppress(RuntimeError):  # one that is expiring already: it ends anyway
                timeout.reschedule(when)


class _Wait:
    __slots__ = ("_deadline", "_timeout")

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline
        self._timeout = asyncio.timeout_at(deadline.when)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._deadline._waits.add(self._timeout)

    async def __aexit__(self, *exc) -> bool | None:
        self._deadline._waits.discard(self._timeout)
        return await self._timeout.__aexit__(*exc)


async def within(items: AsyncIterator[T], deadline: float | Deadline) -> AsyncIterator[T]:
    """`items` until the loop time `deadline` (a `Deadline`: wherever it is moved), counting only the waiting
    for them, never a slow consumer of what was already produced (the yield is outside the timeout)."""
    async with aclosing(items):
        while True:
            try:
                if isinstance(deadline, Deadline):
                    async with deadline.waiting():
                        item = await anext(items)
                else:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(items)
            except StopAsyncIteration:
                return
            yield item
