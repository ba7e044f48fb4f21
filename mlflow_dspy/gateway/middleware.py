"""One ASGI layer in front of every route: request id, bearer auth, body size,
the cap on requests in flight, and one structured log line per request.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: it does not buffer
streamed responses and costs little per request.

It also serves the routes that run a program (`direct`: chat completions,
responses, /invocations, /predict) itself, calling the very endpoint functions
FastAPI has registered, without FastAPI's own middleware stack, routing and
dependency solving in between. Measured at one client, where each request
starts with cold CPU caches, that stack cost about 0.4 ms per request. With
CORS on, Starlette's CORS middleware wraps this one: the dispatch is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from mlflow_dspy.gateway.config import OPEN_ROUTES, Limits
from mlflow_dspy.gateway.errors import GatewayError, response_for
from mlflow_dspy.gateway.metrics import GatewayMetrics
from mlflow_dspy.program.work import tracking_thread_work

access_log = logging.getLogger("mlflow_dspy.gateway.access")

# Routes that run the program: these count against the in-flight cap.
MODEL_ROUTES = ("/v1/chat/completions", "/v1/responses", "/invocations", "/predict", "/predict/stream")
# Routes whose JSON bodies are checked here (valid UTF-8, no lone surrogate) before any route reads them.
BODY_ROUTES = (*MODEL_ROUTES, "/v1/feedback")
# Routes the metrics name; any other path is counted as "other" (a scanner must not grow the label set).
KNOWN_ROUTES = (*BODY_ROUTES, "/v1/models")
def _authorized(header: bytes | None, keys: tuple[str, ...]) -> bool:
    # `Bearer <key>`; the scheme's name is case-insensitive (RFC 7235 section 2.1): bearer, BEARER.
    scheme, _, offered = (header or b"").strip().partition(b" ")
    offered = offered.strip()
    if scheme.lower() != b"bearer" or not offered:
        return False
    # Compare against every key, in constant time each, and decide at the end:
    # neither the timing nor an early exit tells which key came close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered, key.encode())
    return matched


Endpoint = Callable[[Request], Awaitable[Response]]


def lone_surrogate(body: bytes) -> str | None:
    """Where a JSON body holds a string (or a key) with a lone surrogate, as a field path; None if nowhere."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the route says so

    def shown(text: str) -> str:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    def find(value, where: str) -> str | None:
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


class GatewayMiddleware:
    def __init__(self, app, limits: Limits, direct: dict[tuple[str, str], Endpoint] | None = None,
                 metrics: GatewayMetrics | None = None, labels: Callable[[], tuple[str, str]] | None = None,
                 cors_origins: tuple[str, ...] = (), finished: Callable[[dict], None] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics
        self.labels = labels or (lambda: ("", ""))
        # (method, path) -> the endpoint as an ASGI app, served without FastAPI's stack
        self.direct = {route: _serving(endpoint) for route, endpoint in (direct or {}).items()}
        self.in_flight = 0
        self.finished = finished  # called with a request's info once its answer has left (its trace goes on)
        self._entry = self._serve
        if cors_origins:
            # Off by default: a browser page elsewhere may call the gateway only when its origin is listed.
            # The outermost layer, so it sees every request (its errors too) and the dispatch below is the
            # same with CORS on or off.
            self._entry = CORSMiddleware(self._serve, allow_origins=list(cors_origins),
                                         allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type", "X-Session-Id"],
                                         expose_headers=["X-Request-Id", "X-Mlflow-Trace-Id",
                                                         "X-Mlflow-Dspy-Model-Version"])

    async def __call__(self, scope, receive, send) -> None:
        await self._entry(scope, receive, send)

    async def _serve(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        info = {"status": 500, "usage": None, "request_id": request_id}
        scope["mlflow_dspy"] = info  # handlers put token usage here
        path = scope.get("path", "")

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message.setdefault("headers", [])
                extra = [(b"x-request-id", request_id.encode())]
                if info.get("fingerprint"):  # which version gave this answer
                    extra.append((b"x-mlflow-dspy-model-version", info["fingerprint"].encode()))
                # The MLflow trace that holds it: an answer, or a failure the program got as far as recording.
                if info.get("trace_id") and (message["status"] < 400 or getattr(info.get("trace"), "spans", None)):
                    extra.append((b"x-mlflow-trace-id", info["trace_id"].encode()))
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        counted, left_running = False, []
        try:
            error = self._refusal(scope, path)
            if error is None:
                # The body first, under a deadline: a slow upload must not sit
                # on one of the in-flight slots meant for running programs.
                body = await self._read_body(scope, receive)
                if isinstance(body, GatewayError):
                    error = body
            if error is None and body and path in BODY_ROUTES and not _is_utf8(body):
                error = GatewayError(400, "the request body is not valid UTF-8 (JSON must be UTF-8)",
                                     code="invalid_encoding")
            if error is None and body and path in BODY_ROUTES and (b"\\ud" in body or b"\\uD" in body):
                # A JSON escape of a lone surrogate: valid JSON, not valid text. Refused wherever it is.
                where = lone_surrogate(body)
                if where is not None:
                    error = GatewayError(400, f"{where} is not valid Unicode text (it holds a lone surrogate)",
                                         param=where, code="invalid_encoding")
            if error is None and path in MODEL_ROUTES:
                if self.in_flight >= self.limits.max_in_flight:
                    error = GatewayError(
                        429, f"the server is at its limit of {self.limits.max_in_flight} requests in flight; "
                        "retry later", "rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(self.limits.retry_after_seconds)},
                    )
                else:
                    self.in_flight += 1
                    counted = True
                    if self.metrics is not None:
                        self.metrics.in_flight.inc()
            if error is not None:
                await error.response()(scope, receive, send_logged)
                return
            app = self.direct.get((scope.get("method"), path), self.app)
            with tracking_thread_work() as left_running:
                await self._run_until_disconnect(app, scope, body, receive, send_logged, info)
            # One turn of the loop, so the response's coalesced write (internals/uvicorn_protocol.py) leaves before the
            # log line below is written: the client does not wait for our bookkeeping.
            await asyncio.sleep(0)
        finally:
            # A program thread that a departed client (or a deadline) left running still works, on an LM call it
            # cannot cancel: its slot is given back, and its trace (still being recorded) sent on, when it ends.
            still = [future for future in left_running if not future.done()]
            if still:
                self._when_done(still, counted, info)
            else:
                if counted:
                    self._release()
                if self.finished is not None:
                    self.finished(info)
            usage = info.get("usage") or (0, 0)
            if self.metrics is not None and path not in OPEN_ROUTES:
                first = info.get("first_token")
                model, version = (info["model"], info["version"]) if "model" in info else self.labels()
                self.metrics.observe(model, version, path if path in KNOWN_ROUTES else "other", info["status"],
                                     time.perf_counter() - started, first - started if first else None,
                                     info.get("usage"))
            access_log.info(json.dumps({
                "request_id": request_id,
                "method": scope.get("method"),
                "route": path,
                "status": info["status"],
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
            }))

    def _release(self) -> None:
        self.in_flight -= 1
        if self.metrics is not None:
            self.metrics.in_flight.dec()

    def _when_done(self, futures: list[Future], counted: bool, info: dict) -> None:
        """Once every one of these threads has ended: give the slot back (if it held one), send the trace on."""
        loop = asyncio.get_running_loop()
        remaining = [len(futures)]

        def ended(_: Future) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                if counted:
                    self._release()
                if self.finished is not None:
                    self.finished(info)

        def on_loop(done: Future) -> None:
            # Called on the thread that ran it: the count changes on the event loop's thread.
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone, and its count
                loop.call_soon_threadsafe(ended, done)

        for future in futures:
            future.add_done_callback(on_loop)

    @staticmethod
    async def _run_until_disconnect(app, scope, body: bytes, receive, send, info: dict) -> None:
        """Run the app in this task; if the client goes away first, cancel it, and with it the LM call in flight."""
        gone = asyncio.Event()
        task = asyncio.current_task()
        state = {"finished": False, "left": False}

        async def send_tracked(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # After this the server reports "disconnect" to everyone: not a client leaving.
                state["finished"] = True

        async def watch() -> None:
            # The body is already read: the next message from the client can only be its disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not state["finished"]:
                state["left"] = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await app(scope, _replay(body, gone), send_tracked)
        except asyncio.CancelledError:
            if not state["left"]:
                raise  # cancelled from elsewhere (server shutdown): not ours to swallow
        finally:
            watcher.cancel()
        if state["left"]:  # whether the app stopped at the cancellation or ended anyway
            task.uncancel()
            info["status"] = 499  # client closed request (nginx's convention), for the log line

    def _refusal(self, scope, path: str) -> GatewayError | None:
        raw = scope.get("headers") or []
        for name, rule in ((b"authorization", "at most one"), (b"host", "exactly one")):
            count = sum(1 for key, _ in raw if key == name)
            # Two Authorization headers: which one would count? Host: HTTP/1.1 requires exactly one.
            if count > 1 or (name == b"host" and count == 0 and scope.get("http_version") == "1.1"):
                return GatewayError(400, f"a request carries {rule} {name.decode().title()} header (it has {count})",
                                    code="invalid_header")
        headers = dict(raw)
        # A CORS preflight (OPTIONS) never carries the key; it runs no program either.
        needs_key = self.limits.api_keys and path not in self.limits.open_routes and scope.get("method") != "OPTIONS"
        if needs_key and not _authorized(headers.get(b"authorization"), self.limits.api_keys):
            return GatewayError(401, "missing or invalid API key", "authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") == "POST" and path in MODEL_ROUTES:
            media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media != b"application/json":
                return GatewayError(415, "send the body as JSON, with Content-Type: application/json",
                                    code="unsupported_media_type")
            if headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
                return GatewayError(415, "compressed request bodies are not accepted; send plain JSON",
                                    code="unsupported_media_type")
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.limits.max_body_bytes:
                    return _too_large(self.limits.max_body_bytes)
            except ValueError:
                return GatewayError(400, "invalid Content-Length header", code="invalid_header")
        return None

    async def _read_body(self, scope, receive) -> bytes | GatewayError:
        """Read the whole body (chunked ones too), refusing it past the size limit or the deadline."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return b""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return GatewayError(400, "the request body ended before it was complete",
                                            code="incomplete_body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limits.max_body_bytes:
                        return _too_large(self.limits.max_body_bytes)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return GatewayError(408, f"the request body did not arrive within {self.limits.body_timeout_seconds} s",
                                code="body_timeout")


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _serving(endpoint: Endpoint):
    """An endpoint as an ASGI app, its failures answered as FastAPI's handlers would answer them."""

    async def app(scope, receive, send) -> None:
        try:
            response = await endpoint(Request(scope, receive))
        except Exception as exc:
            response = response_for(exc)
        await response(scope, receive, send)

    return app


def _replay(body: bytes, gone: asyncio.Event):
    """A `receive` that hands the app the body already read, then reports the
    client's disconnect when the watcher sees it (a streaming response waits for it)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return replay
