"""What a request must pass before a route reads it: its headers and key (`check_headers`), its body, read
under a deadline and a size limit and checked as text (`read_body`), and the cap on requests running
programs at once (`InFlight`). Each refusal is a GatewayError that says what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mlflow_dspy.gateway.config import ANONYMOUS, ApiKey, Limits
from mlflow_dspy.gateway.errors import GatewayError, invalid_request
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.gateway.openai_wire import shown

# Routes that run a program: these count against the in-flight cap.
PROGRAM_ROUTES = ("/v1/chat/completions", "/v1/responses", "/invocations", "/predict", "/predict/stream")
# Routes whose JSON bodies are checked here (declared as JSON, uncompressed, valid UTF-8, no lone surrogate)
# before any route reads them.
BODY_ROUTES = (*PROGRAM_ROUTES, "/v1/feedback")
# A UTF-8 byte order mark before a JSON body: ignored on every route that reads JSON, as RFC 8259 section 8.1
# allows a parser to (pydantic read one, Python's json refused it: the routes disagreed).
BOM = b"\xef\xbb\xbf"


def check_headers(scope: dict[str, Any], headers: dict[bytes, bytes], limits: Limits) -> str:
    """Host and Authorization once each, the key when keys are set, a JSON body for a route that reads one, a
    declared length within the limit. The caller's identity: its key's name (`anonymous` without keys, or on
    an open route)."""
    raw, path, method = scope.get("headers") or [], scope.get("path", ""), scope.get("method")
    for name, rule in ((b"authorization", "at most one"), (b"host", "exactly one")):
        count = sum(1 for key, _ in raw if key == name)
        # Two Authorization headers: which one would count? Host: HTTP/1.1 requires exactly one.
        if count > 1 or (name == b"host" and count == 0 and scope.get("http_version") == "1.1"):
            raise invalid_request(f"a request carries {rule} {name.decode().title()} header (it has {count})",
                                  code="invalid_header")
    # A CORS preflight (OPTIONS) never carries the key; it runs no program either.
    caller = ANONYMOUS
    if limits.keys and path not in limits.open_routes and method != "OPTIONS":
        caller = key_name(headers.get(b"authorization"), limits.keys)
        if caller is None:
            raise GatewayError(401, "missing or invalid API key", "authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
    if method == "POST" and path in BODY_ROUTES:
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            raise GatewayError(415, "send the body as JSON, with Content-Type: application/json",
                               code="unsupported_media_type")
        if headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            raise GatewayError(415, "compressed request bodies are not accepted; send plain JSON",
                               code="unsupported_media_type")
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            too_large = int(declared) > limits.max_body_bytes
        except ValueError:
            raise invalid_request("invalid Content-Length header", code="invalid_header") from None
        if too_large:
            raise _too_large(limits.max_body_bytes)
    return caller


def key_name(header: bytes | None, keys: tuple[ApiKey, ...]) -> str | None:
    """The name of the key in `Bearer <key>`, if it is one of `keys` (None otherwise); the scheme's name is
    case-insensitive (RFC 7235 section 2.1)."""
    scheme, _, offered = (header or b"").strip().partition(b" ")
    offered = offered.strip()
    if scheme.lower() != b"bearer" or not offered:
        return None
    # Compare against every key, in constant time each, and decide at the end:
    # neither the timing nor an early exit tells which key came close.
    matched = None
    for key in keys:
        if hmac.compare_digest(offered, key.key):
            matched = key.name
    return matched


async def read_body(scope: dict[str, Any], receive: Callable, limits: Limits) -> bytes:
    """The whole body (chunked ones too), refused past the size limit or the deadline; on the routes that read
    JSON, without a leading byte order mark, and refused unless it is text (valid UTF-8, no lone surrogate
    escaped)."""
    if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
        return b""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise invalid_request("the request body ended before it was complete", code="incomplete_body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(limits.max_body_bytes)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within {limits.body_timeout_seconds} s",
                           code="body_timeout") from None
    body = b"".join(chunks)
    if body and scope.get("path") in BODY_ROUTES:
        body = body.removeprefix(BOM)
        _check_text(body)
    return body


def _check_text(body: bytes) -> None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_request("the request body is not valid UTF-8 (JSON must be UTF-8)",
                              code="invalid_encoding") from None
    if b"\\ud" in body or b"\\uD" in body:
        # A JSON escape of a lone surrogate: valid JSON, not valid text. Refused wherever it is, so no
        # route (and no program) ever sees one.
        where = lone_surrogate(body)
        if where is not None:
            raise invalid_request(f"{where} is not valid Unicode text (it holds a lone surrogate)", param=where,
                                  code="invalid_encoding")


def lone_surrogate(body: bytes) -> str | None:
    """Where a JSON body holds a string (or a key) with a lone surrogate, as a field path; None if nowhere."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the route says so

    def find(value: Any, where: str) -> str | None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{shown(key)}" if where else shown(key)
                found = find(key, inner) or find(item, inner)
                if found:
                    return found
        elif isinstance(value, list):
            for index, item in enumerate(value):
                found = find(item, f"{where}[{index}]")
                if found:
                    return found
        return None

    try:
        return find(data, "")
    except RecursionError:
        return None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class InFlight:
    """The cap on requests running programs at once, per worker: past it, 429 at once rather than a queue
    without bound. A slot is given back when the request has ended, and any program thread it left running
    (a module with only a `forward`, which nothing can stop) has ended too."""

    def __init__(self, limits: Limits, metrics: GatewayMetrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.count = 0

    def take(self) -> None:
        if self.count >= self.limits.max_in_flight:
            raise GatewayError(429, f"the server is at its limit of {self.limits.max_in_flight} requests in flight; "
                               "retry later", "rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(self.limits.retry_after_seconds)})
        self.count += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()

    def release(self) -> None:
        self.count -= 1
        if self.metrics is not None:
            self.metrics.in_flight.dec()


def when_done(futures: list[Future], then: Callable[[], None]) -> None:
    """Call `then` on this event loop once every one of these program threads has ended."""
    loop = asyncio.get_running_loop()
    remaining = [len(futures)]

    def ended() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            then()

    def on_loop(_: Future) -> None:
        # Called on the thread that ran it: the count changes on the event loop's thread.
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone, and its count
            loop.call_soon_threadsafe(ended)

    for future in futures:
        future.add_done_callback(on_loop)
