"""The gateway's HTTP protocol caps the header section and its arrival time (real uvicorn, raw sockets),
and it still relies on the uvicorn internals it was written against; so does the graceful stop (the
protocol's `shutdown`, internals/uvicorn_server.py's supervisor)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import socket

import httpx
import pytest
from uvicorn.main import run as uvicorn_run
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn.supervisors.multiprocess import Multiprocess

from mlflow_dspy.internals import uvicorn_protocol as http_protocol
from mlflow_dspy.internals import uvicorn_server
from tests.support.sockets import read_until_closed

# uvicorn 0.54.0's own data_received, which GuardedHttpToolsProtocol.data_received replaces (with the
# header counting added). If uvicorn changes it, re-read it and carry the change over, then update this.
KNOWN_DATA_RECEIVED = "010a7ae59a5d3b1a5e7326ce246878568629d126a076d8af5ba10cab040fae43"


def _source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def test_the_uvicorn_internals_the_protocol_relies_on_are_still_there():
    for name in ("data_received", "on_message_begin", "on_header", "on_headers_complete", "connection_made",
                 "connection_lost", "_unset_keepalive_if_required", "send_400_response", "_should_upgrade",
                 "handle_websocket_upgrade", "_unsupported_upgrade_warning"):
        assert callable(getattr(HttpToolsProtocol, name, None)), f"uvicorn's HttpToolsProtocol lost {name}"
    assert _source_digest(HttpToolsProtocol.data_received) == KNOWN_DATA_RECEIVED, (
        "uvicorn's HttpToolsProtocol.data_received changed: compare it with "
        "mlflow_dspy.internals.uvicorn_protocol.py's GuardedHttpToolsProtocol.data_received, then update the digest"
    )


# uvicorn 0.54.0's code that the graceful stop takes over or relies on: the protocol's `shutdown` (replaced:
# a connection without a request lingers to answer 503), its `on_body` and `on_message_complete` (skipped for
# a request refused that way), and the server's `shutdown` (listeners closed, then each connection's
# `shutdown()`, then the wait for them). If one changes, re-read it against uvicorn_protocol.py's graceful
# stop, then update the digest.
KNOWN_STOP_CODE = {
    HttpToolsProtocol.shutdown: "d7351fa33f00d430e0a4179912a4ed478e0483ce3a9f7409225e71970c064421",
    HttpToolsProtocol.on_body: "dba9c32aeba35b6ae10722f86232d44d93fda42d97711244eeaa51c0a1f3e1c9",
    HttpToolsProtocol.on_message_complete: "1fbad42dc31fc01fd4106a9885b2a2e0f6ce8d38241a3df0f615c6a8663493e0",
    Server.shutdown: "9b33c50562992b1e3cef2a9611408ece6c01d46ee17eaae2091b6091bf826eab",
}


def test_the_uvicorn_internals_the_graceful_stop_relies_on_are_still_there():
    changed = [function.__qualname__ for function, digest in KNOWN_STOP_CODE.items()
               if _source_digest(function) != digest]
    assert not changed, f"uvicorn changed {changed}: compare with mlflow_dspy/internals/uvicorn_protocol.py"
    # The lifespan's state reaches each connection (where the gateway leaves its stop).
    assert "self.app_state = app_state" in inspect.getsource(HttpToolsProtocol.__init__)
    # The supervisor: its sockets, the handlers Supervisor extends, and uvicorn.run's steps that serve() repeats.
    assert "self.sockets = sockets" in inspect.getsource(Multiprocess.__init__)
    for name in ("handle_term", "handle_int", "terminate_all", "join_all"):
        assert callable(getattr(Multiprocess, name, None)), f"uvicorn's Multiprocess lost {name}"
    source = inspect.getsource(uvicorn_run)
    assert "Multiprocess(config, sockets=[sock]).run()" in source and "server.run()" in source, (
        "uvicorn.run changed: compare it with mlflow_dspy/internals/uvicorn_server.py's serve")
    assert issubclass(uvicorn_server.Supervisor, Multiprocess)


@pytest.fixture(scope="module")
def served(shared_gateway):
    """A real uvicorn: the shared gateway process (--header-timeout 3)."""
    return shared_gateway.url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _exchange(url: str, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=wait) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            sock.sendall(data)
        return read_until_closed(sock)


def test_a_header_line_over_the_cap_gets_431_and_the_connection_closes(served):
    reply = _exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and b"header line is longer than 8192 bytes" in reply


def test_an_unfinished_header_line_is_refused_before_it_is_all_buffered(served):
    # 1 MB of one header with no end: refused as soon as the line passes the cap.
    reply = _exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
    assert reply.startswith(b"HTTP/1.1 431")


def test_a_header_section_over_the_cap_gets_431(served):
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))  # 80 lines of 1 KB: over 64 KiB
    reply = _exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431") and b"headers are larger than 65536 bytes" in reply


def test_headers_that_arrive_too_slowly_close_the_connection(served):
    # The server closes it after its --header-timeout (3 s); uvicorn alone keeps half a request open for ever.
    # The socket's own timeout (30 s) only bounds the test: a server that never closed fails it (socket.timeout).
    with socket.create_connection(("127.0.0.1", _port(served)), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half the headers, then nothing
        assert sock.recv(1024) == b""  # the server closed it
    with socket.create_connection(("127.0.0.1", _port(served)), timeout=30) as sock:
        assert sock.recv(1024) == b""  # a connection that sends nothing at all is closed too


def test_ordinary_requests_keep_alive_and_large_bodies_still_pass(served):
    with httpx.Client(base_url=served, timeout=30) as client:
        for _ in range(3):  # one kept-alive connection
            assert client.get("/health").status_code == 200
        big = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40_000}]})
        assert big.status_code == 200, big.text
        headers = {f"X-Ok-{i}": "v" * 1000 for i in range(20)}  # 20 KiB of headers: under the caps
        assert client.get("/health", headers=headers).status_code == 200
    assert http_protocol.HeaderLimits().max_header_bytes == 64 * 1024


def test_two_authorization_headers_or_a_missing_or_doubled_host_get_400(served):
    # Connection: close, so each exchange ends with the answer rather than the keep-alive timeout.
    double_auth = _exchange(served, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n"
                                    b"Authorization: Bearer b\r\nConnection: close\r\n\r\n")
    assert double_auth.startswith(b"HTTP/1.1 400") and b"at most one Authorization header (it has 2)" in double_auth
    no_host = _exchange(served, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert no_host.startswith(b"HTTP/1.1 400") and b"exactly one Host header (it has 0)" in no_host
    two_hosts = _exchange(served, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
    assert two_hosts.startswith(b"HTTP/1.1 400") and b"exactly one Host header (it has 2)" in two_hosts
    assert _exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200")
