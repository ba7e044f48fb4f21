"""The LM client's HTTP/1.1: keep-alive reuse, body framings, broken and oversized answers,
stale connections, cancellation, header safety and TLS, against scripted raw servers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl

import pytest

from mlflow_dspy.lm_engine import http1


def run(coro):
    return asyncio.run(coro)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body, or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


class Server:
    """A TCP server whose every connection runs `script(reader, writer, connection_number)`."""

    def __init__(self, script, ssl_context: ssl.SSLContext | None = None) -> None:
        self.script, self.ssl, self.connections, self.closed = script, ssl_context, 0, asyncio.Event()

    async def __aenter__(self) -> Server:
        async def handle(reader, writer):
            self.connections += 1
            try:
                await self.script(reader, writer, self.connections)
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await http1.close_pool()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/v1/chat/completions"


def answer(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n" + body


async def echo_forever(reader, writer, _):
    while (request := await read_request(reader)) is not None:
        writer.write(answer(request[1]))
        await writer.drain()


def test_requests_reuse_one_kept_alive_connection_and_send_the_body_and_headers():
    seen = []

    async def script(reader, writer, _):
        while (request := await read_request(reader)) is not None:
            seen.append(request[0])
            writer.write(answer(request[1]))

    async def main():
        async with Server(script) as server:
            bodies = []
            for i in range(3):
                response = await http1.pool().request("POST", server.url(), {"Authorization": "Bearer k"},
                                                      f'{{"n": {i}}}'.encode())
                assert response.status == 200 and response.headers["content-length"] == "8"
                bodies.append(await response.read())
            return bodies, server.connections

    bodies, connections = run(main())
    assert bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert connections == 1
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in seen[0] and b"\r\nAuthorization: Bearer k\r\n" in seen[0]


def test_chunked_and_close_delimited_bodies_are_read_whole():
    async def script(reader, writer, number):
        await read_request(reader)
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async def main():
        async with Server(script) as server:
            first = await (await http1.pool().request("GET", server.url(), {})).read()
            await asyncio.sleep(0.05)  # the server closed the first connection after its answer
            second = await (await http1.pool().request("GET", server.url(), {})).read()
            return first, second

    assert run(main()) == (b"hello world", b"until the end")


def test_lines_are_split_across_chunks():
    async def script(reader, writer, _):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: a", b"b\n\ndata: [DO", b"NE]\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async def main():
        async with Server(script) as server:
            response = await http1.pool().request("POST", server.url(), {})
            return [line async for line in response.lines()]

    assert run(main()) == [b"data: ab\n", b"\n", b"data: [DONE]\n"]


@pytest.mark.parametrize("reply, problem", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", "closed before the response was complete"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "closed before the response was complete"),
    (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP response"),
])
def test_broken_answers_raise_a_transport_error_naming_the_problem(reply, problem):
    async def script(reader, writer, _):
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async def main():
        async with Server(script) as server:
            response = await http1.pool().request("POST", server.url(), {})
            await response.read()

    with pytest.raises(http1.TransportError, match=problem):
        run(main())


def test_an_oversized_body_is_refused_and_its_connection_dropped(monkeypatch):
    monkeypatch.setattr(http1, "MAX_BODY_BYTES", 1000)

    async def script(reader, writer, _):
        await read_request(reader)
        writer.write(answer(b"x" * 5000))
        await writer.drain()
        await reader.read()  # until the client drops the connection

    async def main():
        async with Server(script) as server:
            response = await http1.pool().request("POST", server.url(), {})
            with pytest.raises(http1.TransportError, match="larger than 1000 bytes"):
                await response.read()
            await asyncio.wait_for(server.closed.wait(), 5)

    run(main())


def test_a_kept_alive_connection_the_server_dropped_unanswered_is_retried_once_on_a_fresh_one():
    async def script(reader, writer, number):
        request = await read_request(reader)
        writer.write(answer(request[1]))
        await writer.drain()
        if number == 1:
            await read_request(reader)  # the second request on this connection: hang up without a word

    async def main():
        async with Server(script) as server:
            first = await (await http1.pool().request("POST", server.url(), {}, b"one")).read()
            second = await (await http1.pool().request("POST", server.url(), {}, b"two")).read()
            return first, second, server.connections

    assert run(main()) == (b"one", b"two", 2)


def test_a_refused_connection_is_a_transport_error():
    async def main():
        async with Server(echo_forever) as server:
            url = server.url()
        await asyncio.sleep(0.05)
        await http1.pool().request("POST", url, {})

    with pytest.raises(http1.TransportError, match="could not connect"):
        run(main())


def test_cancelling_the_caller_closes_the_connection_so_the_server_sees_it_leave():
    async def script(reader, writer, _):
        await read_request(reader)
        await reader.read()  # no answer; returns when the client closes

    async def main():
        async with Server(script) as server:
            call = asyncio.create_task(http1.pool().request("POST", server.url(), {}, b"{}"))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(server.closed.wait(), 5)
            return server.closed.is_set()

    assert run(main())


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    async def main():
        async with Server(echo_forever) as server:
            await http1.pool().request("POST", server.url(), {"Authorization": "Bearer k\r\nX-Evil: 1"})

    with pytest.raises(ValueError, match="line break"):
        run(main())


def self_signed() -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def test_https_verifies_the_server_certificate(tmp_path, monkeypatch):
    cert, key = self_signed()
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def call():
        async with Server(echo_forever, server_tls) as server:
            return await (await http1.pool().request("POST", server.url("https", "localhost"), {}, b"secret")).read()

    # An unknown certificate is refused...
    with pytest.raises(http1.TransportError, match="could not connect"):
        run(call())
    # ...and one the client trusts is accepted.
    trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    monkeypatch.setattr(http1, "_tls", lambda: trusting)
    assert run(call()) == b"secret"


def test_https_trusts_the_ca_in_ssl_cert_file_as_httpx_does(tmp_path, monkeypatch):
    cert, key = self_signed()
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    http1._tls.cache_clear()  # the context is made once per process; here, once more with the variable set

    async def call():
        async with Server(echo_forever, server_tls) as server:
            return await (await http1.pool().request("POST", server.url("https", "localhost"), {}, b"ok")).read()

    try:
        assert run(call()) == b"ok"
    finally:
        http1._tls.cache_clear()
