"""What the suite shares, and its markers.

Processes one session shares (each started on first use, stopped at the end):

- `stub`: the stub LM (bench/stub_lm.py), answering at once; faults are chosen per request by a marker in the
  question ([fail500], [sleep], [drip], ...). Everyone shares its counters: read them before and after, and
  select its requests by time or by a question of the test's own (tests.support.processes.stub_requests).
- `shared_gateway`: `gateway --program qa` on `stub` (traces off, a 10 s request timeout, a 3 s header
  timeout), for tests whose subject is the process: HTTP/1.1 over TCP, header limits, real streams, clients
  that need a URL. `keyed_gateway`: the same with GATEWAY_API_KEYS. `workers_gateway`: two workers
  configured by their environment alone.
- `registry`: a tracking store where `qa` was logged three times through the CLI on the stub (versions 1-3,
  champion -> 1, challenger -> 2), read-only: a test that changes a registry takes `registry.copy(tmp_path)`.
  It is checked unchanged at the end of the session. Built once per run (the first worker to ask logs it, the
  others wait and read it), so no test may depend on which worker's stub it was logged against: serving reads
  DSPY_LM_API_BASE from its own environment.
- `embedded_store`, `embedded_qa`: `qa` logged through the CLI with the embedded model, once per run
  (`embedded_logged`); each worker works on its own copy of the store.
- `installed`: a fresh virtualenv with the wheel of this checkout installed.

In process: tests.support.inprocess (the gateway app over ASGI, on the stub or any host).

Markers (declared in pyproject.toml). `pytest_collection_modifyitems` below sets them from what a test uses,
and a guard makes `unit` true:

- `e2e`: starts real processes (the stub, a gateway, `mlflow models serve`, the CLI, a trace writer, Spark, a
  child Python), or uses a fixture that did. Set for every test of a fixture above, and for every test of a
  module that imports a process helper (tests.support.processes' starters and child_env, tests.support.cli's
  subprocess runners, `subprocess`) unless the test says `unit` itself.
- `embedded`: runs the embedded SmolLM2 model (in this process or a child).
- `install`: builds a wheel or a virtualenv (also `e2e`).
- `unit`: everything else: in this process, no embedded model. The guard fails a `unit` test that starts a
  process (but `git`, which logging a model runs for its git_commit tag) or loads the embedded model.
- `slow`: every test that is not `unit` (so `-m "not slow"` is `-m unit`); a test may set it itself to stay
  out of `make test-fast`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# Set before llama.cpp's OpenMP runtime loads, here and in every child: `make test` runs several embedded models
# at once on few cores, and OpenMP's default of spinning while it waits made three at once on two cores take 3.5x
# as long as one after another (157 s against 45 s with passive waits; README, Tests). Not a serving default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# And one llama.cpp thread per embedded model: for SmolLM2-135M a second thread bought 7% of wall time for 40% more
# CPU alone (the prefix-cache and concurrency tests: 91 s and 137 CPU-s on two threads, 98 s and 98 CPU-s on one),
# and `make test` keeps both cores busy with other work. Tests that build a context read it from here too.
os.environ.setdefault("MLFLOW_DSPY_EMBEDDED_THREADS", "1")

import pytest

from tests.support import cli as cli_support
from tests.support import processes
from tests.support.cli import run_cli, run_log_cli, store_env
from tests.support.processes import Served, gateway_process, stub_lm
from tests.support.registry import Registry
from tests.support.venv import installed_venv, once_per_run

__all__ = ["run_log_cli", "store_env"]  # still importable from here

STUB_KEY = "sk-stub-test-key-91ac"
LOG_KEY = "sk-planted-at-log-time-7f3a9c"  # the registry's log-time key: it must reach no file of the store

EMBEDDED_FIXTURES = {"embedded_logged", "embedded_store", "embedded_qa"}
PROCESS_FIXTURES = {"stub", "stub_env", "shared_gateway", "keyed_gateway", "workers_gateway",
                    "registry", "installed", *EMBEDDED_FIXTURES}
INSTALL_FIXTURES = {"installed"}
# A module holding one of these starts processes: its tests are e2e unless marked unit.
PROCESS_HELPERS = (subprocess, processes.stub_lm, processes.gateway, processes.gateway_process,
                   processes.mlflow_serve, processes.running, processes.child_env, cli_support.run_cli,
                   cli_support.run_log_cli)
KINDS = ("e2e", "embedded", "install")


# -- markers -------------------------------------------------------------------------------------------------
def _starts_processes(module) -> bool:
    return any(value is helper for value in vars(module).values() for helper in PROCESS_HELPERS)


def pytest_collection_modifyitems(config, items):
    _mark_kinds(items)
    _heaviest_modules_first(items)


def _mark_kinds(items) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & EMBEDDED_FIXTURES:
            item.add_marker("embedded")
        if used & INSTALL_FIXTURES or item.get_closest_marker("install"):
            item.add_marker("install")
            item.add_marker("e2e")
        if used & PROCESS_FIXTURES:
            item.add_marker("e2e")
        claims_unit = item.get_closest_marker("unit") is not None
        kinds = [kind for kind in KINDS if item.get_closest_marker(kind)]
        if claims_unit and kinds:
            raise pytest.UsageError(f"{item.nodeid} is marked unit and {', '.join(kinds)}: it is one or the other")
        if not claims_unit and not kinds:
            module = getattr(item, "module", None)
            if module is not None and _starts_processes(module):
                item.add_marker("e2e")
            elif not item.get_closest_marker("slow"):
                item.add_marker("unit")
        if item.get_closest_marker("unit") is None:
            item.add_marker("slow")


# What goes first, for `make test`'s workers (pytest-xdist, --dist loadfile: a module's tests run on one worker,
# in order, sharing its module fixtures): the longest modules first, so that none starts late and runs alone at the
# end (the 4-worker run of 2026-12-07 19:54 handed the 6-minute tutorial module out at minute 13, and the other
# workers sat idle for its last 3 minutes). How long each took is in tests/module_seconds.json, written by a run
# with `--module-seconds`; a module not in it is guessed from its kind. Within equal times, collection order.
MODULE_SECONDS = Path(__file__).parent / "module_seconds.json"
GUESSED_SECONDS = {"install": 300.0, "embedded": 150.0, "e2e": 30.0}  # else (unit) 1 s


def pytest_addoption(parser):
    parser.addoption("--module-seconds", metavar="PATH", default=None,
                     help="write how long each test module took (setup, call and teardown) to PATH as JSON, "
                          "for the order in which `make test` hands modules out (tests/module_seconds.json)")


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _heaviest_modules_first(items) -> None:
    known = json.loads(MODULE_SECONDS.read_text()) if MODULE_SECONDS.exists() else {}
    seconds: dict[str, float] = {}
    for item in items:
        module = _module(item.nodeid)
        if module in known:
            seconds[module] = float(known[module])
        else:
            guesses = [guess for kind, guess in GUESSED_SECONDS.items() if item.get_closest_marker(kind)]
            seconds[module] = max([seconds.get(module, 1.0), *guesses])
    order = {module: position for position, module in enumerate(seconds)}

    def longest_first(item) -> tuple[float, int]:
        module = _module(item.nodeid)
        return -seconds[module], order[module]

    items.sort(key=longest_first)


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Each phase's duration, summed per module (in the controller, from every worker's reports)."""
    module = _module(report.nodeid)
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = session.config.getoption("--module-seconds")
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        ordered = dict(sorted(((m, round(s, 1)) for m, s in _module_seconds.items()), key=lambda kv: -kv[1]))
        Path(path).write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.fixture(autouse=True)
def _unit_stays_in_process(request, monkeypatch):
    """A `unit` test that starts a process or loads the embedded model fails (even if the code under test
    swallowed the refusal)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import multiprocessing.process

    import llama_cpp

    from mlflow_dspy.lm_engine import llama_native

    broken: list[str] = []

    def refuse(what: str):
        def refused(*args, **kwargs):
            broken.append(what)
            raise AssertionError(f"a test marked unit {what}")

        return refused

    execute_child = subprocess.Popen._execute_child

    def child(self, args, *rest, **kwargs):
        # The one child a unit test may start: `git`, which logging asks for its git_commit tag.
        if (args[0] if isinstance(args, list | tuple) else str(args).split()[0]) == "git":
            return execute_child(self, args, *rest, **kwargs)
        return refuse(f"started a process ({args!r:.80})")()

    monkeypatch.setattr(subprocess.Popen, "_execute_child", child)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("started a process"))
    monkeypatch.setattr(os, "fork", refuse("forked"))
    monkeypatch.setattr(os, "posix_spawn", refuse("started a process"))
    monkeypatch.setattr(llama_native.NativeModel, "__init__", refuse("loaded the embedded model"))
    monkeypatch.setattr(llama_cpp.Llama, "__init__", refuse("loaded the embedded model"))
    yield
    if broken:
        pytest.fail(f"{request.node.nodeid} is marked unit but {broken[0]}: mark it e2e or embedded "
                    "(tests/conftest.py says which)", pytrace=False)


# -- processes the session shares ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def stub(tmp_path_factory) -> str:
    """The stub LM's OpenAI base URL (…/v1)."""
    with stub_lm(tmp_path_factory.mktemp("stub")) as base:
        yield base


@pytest.fixture(scope="session")
def stub_env(stub) -> dict[str, str]:
    """What a process serving a program on the stub needs in its environment."""
    return {"DSPY_LM_API_BASE": stub, "OPENAI_API_KEY": STUB_KEY}


SHARED_TARGET = ["--program", "qa", "--lm", "openai/stub-echo", "--no-traces", "--request-timeout", "10"]


@pytest.fixture(scope="session")
def shared_gateway(stub_env, tmp_path_factory) -> Served:
    """`gateway --program qa` on the stub: answers are `<field>: <question>`; [sleep] gets 504 after 10 s."""
    with gateway_process(SHARED_TARGET, tmp_path_factory.mktemp("shared_gateway"), "--header-timeout", "3",
                         **stub_env) as served:
        yield served


@pytest.fixture(scope="session")
def keyed_gateway(stub_env, tmp_path_factory) -> Served:
    """The same gateway with two API keys (key-alpha, key-beta)."""
    with gateway_process(SHARED_TARGET, tmp_path_factory.mktemp("keyed_gateway"),
                         GATEWAY_API_KEYS="key-alpha,key-beta", **stub_env) as served:
        yield served


WORKERS_ENV = {"MLFLOW_DSPY_PROGRAM": "qa", "MLFLOW_DSPY_LM": "openai/stub-echo", "MLFLOW_DSPY_TRACES": "0",
               "MLFLOW_DSPY_WORKERS": "2", "MLFLOW_DSPY_MAX_MESSAGES": "1",
               "MLFLOW_DSPY_MAX_HEADER_LINE_BYTES": "2000"}


@pytest.fixture(scope="session")
def workers_gateway(stub_env, tmp_path_factory) -> Served:
    """`mlflow-dspy gateway` with no flag but the port, as Kubernetes runs it: two workers, each rebuilding its
    configuration from the variables (WORKERS_ENV: at most 1 message, header lines of at most 2000 bytes)."""
    with gateway_process([], tmp_path_factory.mktemp("workers_gateway"), **WORKERS_ENV, **stub_env) as served:
        yield served


@pytest.fixture(scope="session")
def registry(stub, tmp_path_factory) -> Registry:
    """qa logged three times through the CLI on the stub (LOG_KEY planted in the log's environment), version 1
    the champion and 2 the challenger: built once per run by the first worker to ask, then shared. Read it;
    change a copy."""
    shared = Registry.read(once_per_run(tmp_path_factory, "registry", lambda folder: _build_registry(folder, stub)))
    before = shared.fingerprint()
    yield shared
    assert shared.fingerprint() == before, "a test changed the shared registry: it must work on registry.copy()"


def _build_registry(folder: Path, stub: str) -> None:
    built = Registry(folder)
    env = built.env(DSPY_LM="openai/stub-echo", DSPY_LM_API_BASE=stub, OPENAI_API_KEY=LOG_KEY)
    for _ in range(3):
        logged = run_cli("log", "qa", "--json", env=env, timeout=600)
        built.logged.append(cli_support.last_json(logged))
        built.log_output.append(logged.stdout + logged.stderr)
    for version, alias in ((1, "champion"), (2, "challenger")):
        promoted = cli_support.cli_in_process("promote", "--name", "dspy-qa", "--version", str(version),
                                              "--alias", alias, env=env)
        assert promoted.code == 0, promoted.err[-2000:]
    built.write()


@pytest.fixture(scope="session")
def embedded_logged(tmp_path_factory) -> Registry:
    """A store where qa was logged with the embedded model through the CLI: once per run, by the first worker to
    ask (the others wait and read it). Tests take their worker's copy, `embedded_store`."""
    return Registry.read(once_per_run(tmp_path_factory, "embedded_qa", _log_embedded_qa))


def _log_embedded_qa(folder: Path) -> None:
    built = Registry(folder)
    built.logged.append(run_log_cli("--program", "qa", env=built.env()))
    built.write()


@pytest.fixture(scope="session")
def embedded_store(embedded_logged, tmp_path_factory) -> Path:
    """This worker's copy of that store (promotes and traces land in it)."""
    return embedded_logged.copy(tmp_path_factory.mktemp("embedded") / "store").root


@pytest.fixture(scope="session")
def embedded_qa(embedded_logged, embedded_store) -> dict:
    """What `log --json` answered for qa logged with the embedded model, in `embedded_store`."""
    return embedded_logged.logged[0]


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with mlflow-dspy installed from a wheel of this checkout (minutes)."""
    return installed_venv(tmp_path_factory)
