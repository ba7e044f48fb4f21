"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with limits on the header
section, and (a speed-up) what it writes in one turn of the event loop sent as one write.

This is the one module that relies on uvicorn's internals (`HttpToolsProtocol`'s
parser callbacks, `data_received`, `transport`); tests/test_internals_uvicorn_protocol.py
fails loudly if they change. The coalescing is a speed-up (off with
`MLFLOW_DSPY_SPEEDUPS=0`); the header limits always apply.

**Header limits.** httptools buffers a header line whole before it reports it,
and uvicorn sets no limit: 16 connections each holding an unfinished 8 MB
header added 149 MiB of RSS, and one that sends half its headers stayed open
forever. Here a header line over `max_header_line_bytes`, or a header section
over `max_header_bytes`, gets 431 and the connection closes; a header section
that has not arrived `header_timeout` seconds after the request began (or the
connection opened) closes the connection.

**A graceful stop.** On SIGTERM uvicorn stops listening, then calls `shutdown()` on every
connection: one with a request running is left to finish it; one without (just accepted, its
request still on the way, or idle between requests) uvicorn closes unanswered. Here `shutdown()`
first tells the app that the stop has begun (the callable its lifespan left in the server's state
under `GRACEFUL_STOP`: the gateway gives its runs --graceful-timeout from then), and a connection
without a request stays open `STOP_LINGER` seconds more: a request that arrives on it gets a 503 in
the gateway's error shape (`server_shutting_down`, `Retry-After`) and the connection closes; none,
and it closes then.

**Coalescing.** uvicorn writes a response's status line and headers, then its body, with two
`transport.write` calls, so two sends: on loopback each one wakes the client
on its own. Measured at one client (timestamps around each write, 78
requests): 0.38 ms for the headers, 0.54 ms for the body. Holding writes
until the end of the current turn of the loop sends a plain JSON answer as
one write; a streamed answer still leaves event by event, one turn later at
most.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlflow_dspy.internals import speedups_enabled
from mlflow_dspy.internals.header_limits import HeaderLimits

# The key under which the app's lifespan state holds what to call when the server's graceful stop begins.
GRACEFUL_STOP = "mlflow_dspy.graceful_stop"
# Seconds a connection without a request stays open once the stop has begun, to answer one that arrives 503.
STOP_LINGER = 2.0
STOPPING_MESSAGE = "the server is stopping; send the request again (to another replica)"


class HeaderRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with a size cap and a deadline on every request's header section."""

    limits: HeaderLimits | None = None  # read once per process from its variables (header_limits.py)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if GuardedHttpToolsProtocol.limits is None:
            GuardedHttpToolsProtocol.limits = HeaderLimits.from_env()
        super().connection_made(transport)
        self._in_headers = True
        self._header_bytes = 0
        self._open_line = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._stopping = False  # the server's graceful stop began while no request ran here
        self._refusing = False  # a request that arrived since: answered 503 once it has arrived whole
        self._linger: asyncio.TimerHandle | None = None
        self._start_header_clock()

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._open_line = 0
        self._start_header_clock()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + 4  # "name: value\r\n"
        if line > self.limits.max_header_line_bytes:
            raise HeaderRefused(f"a header line is longer than {self.limits.max_header_line_bytes} bytes")
        self._count(line)
        super().on_header(name, value)

    def _count(self, size: int, pending: int = 0) -> None:
        """Header bytes the parser has reported (plus `pending`, still buffered), checked against the cap."""
        self._header_bytes += size
        if self._header_bytes + pending > self.limits.max_header_bytes:
            raise HeaderRefused(f"the request's headers are larger than {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._stop_header_clock()
        if self._stopping:
            self._refusing = True  # no cycle, no task: the app never sees it
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusing:
            # Answered once it has all arrived: closing over unread bytes would reset the connection, answer and all.
            self._refusing = False
            if self.transport.is_closing():
                return
            self._answer_and_close(b"503 Service Unavailable", STOPPING_MESSAGE, "service_unavailable",
                                   "server_shutting_down", b"retry-after: 1\r\n")
            return
        super().on_message_complete()

    # -- the graceful stop -----------------------------------------------------------------
    def shutdown(self) -> None:
        """uvicorn's graceful stop has begun: tell the app (once is enough; it may be told again); a request
        running here finishes, then the connection closes; no request: see the module's docstring."""
        begin: Callable[[], None] | None = (self.app_state or {}).get(GRACEFUL_STOP)
        if begin is not None:
            begin()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        self._stopping = True
        self._linger = self.loop.call_later(STOP_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._unset_keepalive_if_required()
            self.parser.feed_data(data)
            if self._in_headers:
                # Still inside a header section after this chunk: httptools holds the unfinished
                # line, so it is measured here, chunk by chunk (asyncio reads at most 256 KiB at a time).
                _, newline, tail = data.rpartition(b"\n")
                self._open_line = len(tail) if newline else self._open_line + len(data)
                if self._open_line > self.limits.max_header_line_bytes:
                    raise HeaderRefused(f"a header line is longer than {self.limits.max_header_line_bytes} bytes")
                self._count(0, pending=self._open_line)
        except HeaderRefused as refused:
            self._refuse(refused.message)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeaderRefused):
                self._refuse(exc.__context__.message)
            else:
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _refuse(self, message: str) -> None:
        """431 Request Header Fields Too Large, in the gateway's error shape, then close."""
        self._stop_header_clock()
        self._in_headers = False
        self._answer_and_close(b"431 Request Header Fields Too Large", message, "invalid_request_error",
                               "headers_too_large")

    def _answer_and_close(self, status: bytes, message: str, kind: str, code: str, headers: bytes = b"") -> None:
        """An answer in the gateway's error shape, written here (no app involved), then close."""
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        head = (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + headers
                + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
        self.transport.write(head + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)


class CoalescingTransport:
    """A transport whose writes in one turn of the loop leave together; everything else passes through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()  # a response written just before closing still goes out
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(GuardedHttpToolsProtocol):
    """The guarded protocol, over a coalescing transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def http_protocol() -> type[GuardedHttpToolsProtocol]:
    """What the gateway passes to uvicorn as `http=`: header limits always, coalescing with the speed-ups on."""
    return CoalescingHttpToolsProtocol if speedups_enabled() else GuardedHttpToolsProtocol
