"""The gateway in this process, for tests whose subject is what it answers rather than the process serving it:
the app (`mlflow_dspy.gateway.app.Gateway`, a plain ASGI app) over httpx's ASGI transport, or over starlette's
TestClient (an httpx.Client) for SDKs that take a synchronous HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
    """What `mlflow models serve -m MODEL_URI` serves, in this process: the model's folder (a local store's own,
    as MLflow hands it out) loaded by `mlflow.pyfunc.load_model` and MLflow's own scoring app
    (`mlflow.pyfunc.scoring_server.init`, the app its uvicorn runs) over starlette's TestClient, in `env`'s
    store and LM settings, with the 300 s request limit the suite gives `mlflow models serve`. For tests whose
    subject is a model's answers through MLflow rather than MLflow's server process: such a test keeps one
    real `mlflow models serve` beside it.

    The model answers from its own code: a package of the same name this process imported already is set aside
    while it is loaded and served. Afterwards the process is as before: the modules imported from the model's
    folder, its sys.path entry, the loader's note of where they came from (`recipe._imported_from`), MLflow's
    serving flag and the embedded model's contexts this load made are gone, and the set-aside modules back."""
    import sys

    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    from mlflow_dspy.artifact import recipe
    from mlflow_dspy.lm_engine import llama_engine
    from tests.support.cli import environment

    # init() marks the process as serving; environment() puts the variable back as it was afterwards.
    settings = {**env, _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name: "true", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "300"}
    path, imported_from = list(sys.path), dict(recipe._imported_from)
    runtimes, had_model = set(llama_engine._runtimes), bool(llama_engine._models)
    set_aside: dict[str, object] = {}
    folder: Path | None = None
    try:
        with environment(settings):
            folder = Path(mlflow.artifacts.download_artifacts(model_uri)).resolve()
            code = folder / "code"
            carried = {entry.stem for entry in code.iterdir()} - recipe.SHARED_PACKAGES if code.is_dir() else set()
            set_aside = {name: sys.modules.pop(name) for name in list(sys.modules)
                         if name.split(".")[0] in carried}
            app = scoring_server.init(mlflow.pyfunc.load_model(str(folder)))
            stray = [name for name in carried if name in sys.modules and not _inside(sys.modules[name], folder)]
            assert not stray, f"{model_uri} was built from code outside its folder: {stray}"
            with TestClient(app, base_url="http://mlflow-serve") as client:
                yield client
    finally:
        for name in [name for name, module in sys.modules.items() if folder and _inside(module, folder)]:
            del sys.modules[name]
        sys.modules.update(set_aside)
        sys.path[:] = path
        recipe._imported_from.clear()
        recipe._imported_from.update(imported_from)
        for n_ctx in set(llama_engine._runtimes) - runtimes:
            llama_engine._runtimes.pop(n_ctx).scheduler.close()
        if not had_model:
            llama_engine._models.clear()


def _inside(module: object, folder: Path) -> bool:
    """Whether a module (its file, or a package's folders) was imported from under `folder`."""
    places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
    return any(str(place).startswith(f"{folder}/") for place in places)
