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


@contextlib.contextmanager
def mlflow_scoring_client(model_uri: str, env: dict[str, str]) -> Iterator[httpx.Client]:
    """What `mlflow models serve -m MODEL_URI` serves, in this process: the model loaded by
    `mlflow.pyfunc.load_model` and MLflow's own scoring app (`mlflow.pyfunc.scoring_server.init`, the app its
    uvicorn runs) over starlette's TestClient, in `env`'s store and LM settings. For tests whose subject is a
    model's answers through MLflow rather than MLflow's server process: such a test keeps one real
    `mlflow models serve` beside it.

    Afterwards the process imports as before: the modules the model's code added (imported from its private copy,
    which is left on disk until exit while they are), its sys.path entry and the loader's note of where they came
    from (`recipe._imported_from`, which would have the next load of a same-named package replace the user's own)
    go, so that tests after it import a user's package of the same name from their folder."""
    import sys
    import tempfile

    import mlflow.pyfunc
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    from mlflow_dspy.artifact import recipe
    from tests.support.cli import environment

    # init() marks the process as serving; environment() puts the variable back as it was afterwards.
    modules, path, imported_from = set(sys.modules), list(sys.path), dict(recipe._imported_from)
    try:
        with environment({**env, _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name: "true"}):
            app = scoring_server.init(mlflow.pyfunc.load_model(model_uri))
            with TestClient(app, base_url="http://mlflow-serve") as client:
                yield client
    finally:
        temporary = tempfile.gettempdir()
        for name in set(sys.modules) - modules:
            module = sys.modules[name]
            places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
            if any(str(place).startswith(temporary) for place in places):
                del sys.modules[name]
        sys.path[:] = path
        recipe._imported_from.clear()
        recipe._imported_from.update(imported_from)
