"""One deadline over an async stream, for the LM's stream and the gateway's alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


async def within(items: AsyncIterator[T], deadline: float) -> AsyncIterator[T]:
    """`items` until the loop time `deadline`, counting only the waiting for them, never a
    slow consumer of what was already produced (the yield is outside the timeout)."""
    async with aclosing(items):
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(items)
            except StopAsyncIteration:
                return
            yield item
