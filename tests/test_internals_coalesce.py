"""The gateway's uvicorn protocol sends what it writes in one turn of the loop as one write."""

import asyncio

from mlflow_dspy.internals.uvicorn_protocol import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def _turn() -> None:
    await asyncio.sleep(0)


def test_writes_in_one_turn_leave_as_one_write_and_later_writes_as_another():
    async def main():
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert inner.writes == []  # nothing sent mid-turn
        await _turn()
        transport.write(b"data: next\n\n")
        await _turn()
        return inner.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"data: next\n\n"]


def test_close_sends_what_is_pending_first_and_abort_drops_it():
    async def main():
        closing, aborting = RecordingTransport(), RecordingTransport()
        loop = asyncio.get_running_loop()
        first, second = CoalescingTransport(closing, loop), CoalescingTransport(aborting, loop)
        first.write(b"last answer")
        first.close()
        second.write(b"never sent")
        second.abort()
        await _turn()
        return closing, aborting

    closing, aborting = asyncio.run(main())
    assert closing.writes == [b"last answer"] and closing.closed
    assert aborting.writes == [] and aborting.aborted


def test_other_transport_methods_pass_through():
    async def main():
        return CoalescingTransport(RecordingTransport(), asyncio.get_running_loop()).get_extra_info("peername")

    assert asyncio.run(main()) == "info:peername"
