"""The gateway in this process, for tests whose subject is what it answers rather than the process serving it:
the app (`mlflow_dspy.gateway.app.Gateway`, a plain ASGI app) over httpx's ASGI transport, or over starlette's
TestClient (an httpx.Client) for SDKs that take a synchronous HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx

from mlflow_dspy.gateway.app import Gateway, GatewayConfig, create_app
from mlflow_dspy.lm_engine.select import adapter_for, build_lm
from mlflow_dspy.program.target import open_target
from mlflow_dspy.runtime.host import ProgramHost

BASE = "http://gateway"


def program_host(program: str = "qa", lm: str = "openai/stub-echo", api_base: str | None = None) -> ProgramHost:
    """A program served from its code as `gateway --program PROGRAM --lm LM` serves it (named dspy-<name>), its
    LM an OpenAI-compatible server at `api_base` (the stub) through the gateway's own HTTP engine."""
    target = open_target(program)
    model = build_lm(lm, api_base)
    host = ProgramHost(target.chat(), model, adapter_for(model), target.config.model_name, f"program:{program}")
    host.example = [{"role": "user", "content": target.input_example()}]
    return host


def gateway_app(stub: str | None = None, program: str = "qa", host: ProgramHost | None = None,
                **config) -> Gateway:
    """The gateway app serving `program` on the stub LM at `stub` (or `host`; or, with neither, what `config`
    names, loaded by the lifespan). Traces are off unless `config` turns them on."""
    config.setdefault("traces", False)
    if host is None and stub is not None:
        host = program_host(program, api_base=stub)
    return create_app(GatewayConfig(**config), host=host)


@contextlib.asynccontextmanager
async def asgi_client(app: Gateway, lifespan: bool = False, ready: bool = True,
                      **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to `app` in this process; with `lifespan`, the app started as a server starts it
    (speed-ups, the models loaded in the background, the trace writer) and, with `ready`, once /ready says so."""
    transport = httpx.ASGITransport(app=app)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.lifespan(app.app))
        client = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url=BASE,
                                                                   headers=headers, timeout=120))
        if lifespan and ready:
            await until_ready(client)
        yield client


async def until_ready(client: httpx.AsyncClient, seconds: float = 300) -> httpx.Response:
    """/ready, once the models have loaded (or failed to)."""
    for _ in range(int(seconds / 0.1)):
        ready = await client.get("/ready")
        if ready.status_code == 200 or "loading" not in ready.text:
            return ready
        await asyncio.sleep(0.1)
    raise TimeoutError(f"/ready after {seconds} s: {ready.text}")


@contextlib.contextmanager
def sync_client(app: Gateway) -> Iterator[httpx.Client]:
    """A synchronous httpx client on `app` (starlette's TestClient: the app runs on its own event loop in a
    thread, started and stopped with its lifespan), for SDKs that take an `http_client`."""
    from starlette.testclient import TestClient

    with TestClient(app, base_url=BASE, raise_server_exceptions=True) as client:
        yield client
