"""The team stack on one machine: PostgreSQL, `mlflow server` on it, gateway replicas behind HAProxy, Prometheus.

The one place that knows how to start and stop these parts (`make stack`, `make stack-down`, the team-stack
tests and `make bench --only stack` all use the `Stack` class). Every part is a real process started from
Debian's or PyPI's packages; each one's pid file and log are in the stack's folder, and `down()` stops them in
reverse order and keeps the data (PostgreSQL's cluster and the artifacts) for the next `up()`:

    client ──► HAProxy :8100 ──► gateway replica 1 :8101 ─┐   (health check: GET /ready)
                      └───────► gateway replica 2 :8102 ─┤
    Prometheus :9090 scrapes both replicas' /metrics     ├─► mlflow server :5050 ──► PostgreSQL :5433
                                                         │   (--serve-artifacts: <folder>/artifacts)
    log / eval / promote / traces export / improve ──────┘

PostgreSQL runs as the `postgres` user when the caller is root (initdb and the server refuse root); its
cluster is `<folder>/pg/data`, its socket `<folder>/pg/run`, its TCP port on 127.0.0.1 only, trust auth.

    python scripts/stack.py up [--dir .stack]     # start what is not running (logs and registers qa first
                                                  # if the registry has no dspy-qa@champion)
    python scripts/stack.py status
    python scripts/stack.py down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the OS user the cluster runs as when the caller is root, and its superuser role
DATABASE = "mlflow"
MODEL = "dspy-qa"
# Offline, `mlflow server` hangs at start-up without the first two (litellm's price map, telemetry). Its job
# runners (several processes, tens of seconds of CPU at each start) serve MLflow's GenAI jobs, not this stack.
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "true",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class Ports:
    """The stack's ports on 127.0.0.1 (`make stack`'s defaults; the tests take free ones)."""

    postgres: int = 5433
    mlflow: int = 5050
    lb: int = 8100
    replicas: tuple[int, ...] = (8101, 8102)
    haproxy_stats: int = 8404
    prometheus: int = 9090

    @classmethod
    def free(cls, replicas: int = 2) -> Ports:
        import socket

        socks = []
        for _ in range(5 + replicas):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        ports = [s.getsockname()[1] for s in socks]
        for sock in socks:
            sock.close()
        return cls(ports[0], ports[1], ports[2], tuple(ports[5:]), ports[3], ports[4])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child, exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Stack:
    """The stack in `folder` on `ports`. `lm_env` is the environment the replicas' (and the bootstrap `log`'s)
    LM needs (empty: the models' own LM, e.g. the embedded SmolLM2); `models` the URIs each replica serves."""

    folder: Path
    ports: Ports = field(default_factory=Ports)
    lm_env: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = (f"models:/{MODEL}@champion",)
    reload_interval: float = 2.0
    server_workers: int = 2
    gateway_options: tuple[str, ...] = ()
    prometheus: bool = True  # when Debian's prometheus is installed
    postgres_options: str = ""  # more of the server's options, e.g. "-F" (fsync off) for a throwaway cluster
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        self._procs: dict[str, subprocess.Popen] = {}

    # -- where things are ---------------------------------------------------------------------------------------
    @property
    def pg_dir(self) -> Path:
        return self.folder / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_socket_dir(self) -> Path:
        return self.pg_dir / "run"

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.ports.postgres}/{DATABASE}"

    @property
    def backend_store_uri(self) -> str:
        """What `mlflow server` is started on: the database through mlflow-dspy's store plugin (MLflow's own
        store, with the trace writes of `log_spans` as a few multi-row inserts: README, Traces)."""
        return f"mlflow-dspy+{self.database_url}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports.mlflow}"

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.lb}"

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.replicas[index]}"

    @property
    def replica_names(self) -> list[str]:
        return [f"gw{i + 1}" for i in range(len(self.ports.replicas))]

    def pidfile(self, name: str) -> Path:
        return self.folder / "run" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this stack (log, eval, promote, ...): the server as tracking URI."""
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(ROOT)
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env.update(self.lm_env)
        env.update(extra)
        return env

    @property
    def feedback_secret(self) -> str:
        """The replicas' shared MLFLOW_DSPY_FEEDBACK_SECRET (made at the first `up`, kept in the folder): an
        answer's feedback token must be accepted by whichever replica the load balancer sends the feedback to."""
        path = self.folder / "secrets" / "feedback-secret"
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            path.touch(0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip()

    # -- processes ------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> int:
        self.logfile(name).parent.mkdir(parents=True, exist_ok=True)
        self.pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with self.logfile(name).open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(args)}\n".encode())
            out.flush()
            proc = subprocess.Popen(args, cwd=ROOT, env=env or self.client_env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[name] = proc
        self.pidfile(name).write_text(str(proc.pid))
        return proc.pid

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pidfile(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _wait_ready(self, name: str, url: str, timeout: float = 300, expect: Callable[[httpx.Response], bool]
                    | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.pid(name) is None:
                raise RuntimeError(f"{name} exited:\n{self.logfile(name).read_text(errors='replace')[-3000:]}")
            try:
                reply = httpx.get(url, timeout=3, trust_env=False)
                if reply.status_code == 200 and (expect is None or expect(reply)):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {url} not ready after {timeout:.0f}s:\n"
                                   f"{self.logfile(name).read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 40) -> None:
        """Stop one part (its process group) by its pid file: `sig`, then SIGKILL after `timeout` s."""
        pid = self.pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while self._running(name, pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._running(name, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                while self._running(name, pid):
                    time.sleep(0.1)
        self.pidfile(name).unlink(missing_ok=True)
        self._procs.pop(name, None)

    def _running(self, name: str, pid: int) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return _alive(pid)

    def kill(self, name: str) -> None:
        """SIGKILL one part, as a crash: no graceful stop."""
        self.stop(name, signal.SIGKILL, timeout=10)

    # -- PostgreSQL -----------------------------------------------------------------------------------------------
    def _as_pg_user(self) -> list[str]:
        return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self._as_pg_user(), *args], cwd=self.pg_dir, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def _pg_ready(self) -> bool:
        done = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.ports.postgres)],
                              capture_output=True)
        return done.returncode == 0

    def start_postgres(self) -> None:
        self.pg_socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # The cluster's owner must reach its folder: every parent traversable, the folder its own.
            user = pwd.getpwnam(PG_USER)
            for parent in [self.folder, *self.folder.parents]:
                if parent.stat().st_mode & 0o001 == 0:
                    raise PermissionError(f"{PG_USER} cannot reach {self.pg_dir}: {parent} is not traversable "
                                          f"(chmod o+x {parent})")
            for path in (self.pg_dir, self.pg_socket_dir, *([self.pg_data] if self.pg_data.exists() else [])):
                os.chown(path, user.pw_uid, user.pw_gid)
        if not (self.pg_data / "PG_VERSION").exists():
            self.log(f"initdb {self.pg_data}")
            self._pg(str(PG_BIN / "initdb"), "-D", str(self.pg_data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                     "--no-instructions")
        if not self._pg_ready():
            self.log(f"PostgreSQL on 127.0.0.1:{self.ports.postgres}")
            options = (f"-p {self.ports.postgres} -k {self.pg_socket_dir} -c listen_addresses=127.0.0.1 "
                       f"-c max_connections=200 {self.postgres_options}").strip()
            self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-l", str(self.pg_dir / "postgres.log"),
                     "-o", options, "-w", "-t", "120", "start")
        self._create_database()

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.ports.postgres, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DATABASE}")
        conn.close()

    def stop_postgres(self) -> None:
        if (self.pg_data / "postmaster.pid").exists():
            self.log("PostgreSQL: pg_ctl stop -m fast")
            self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "stop", check=False)

    def restart_postgres(self) -> None:
        """pg_ctl stop -m fast, then start again (not `pg_ctl restart`, whose server would write to pg_ctl's
        output instead of the log file: a pipe nobody reads once pg_ctl is gone)."""
        self.stop_postgres()
        self.start_postgres()

    def sql(self, query: str, *params) -> list[tuple]:
        """A query on MLflow's database (psycopg2)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.ports.postgres, user=PG_USER, dbname=DATABASE)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        finally:
            conn.close()

    # -- mlflow server --------------------------------------------------------------------------------------------
    def server_args(self) -> list[str]:
        return [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.backend_store_uri, "--serve-artifacts",
                "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                "--port", str(self.ports.mlflow), "--workers", str(self.server_workers)]

    def start_server(self) -> None:
        if self.pid("mlflow") is None:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            self.log(f"mlflow server on {self.tracking_uri} (PostgreSQL, artifacts in {self.artifacts})")
            self._spawn("mlflow", self.server_args(), self.client_env(**SERVER_ENV))
        self._wait_ready("mlflow", f"{self.tracking_uri}/health")

    # -- the registered model -------------------------------------------------------------------------------------
    def champion(self, name: str = MODEL) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return str(MlflowClient(self.tracking_uri).get_model_version_by_alias(name, "champion").version)
        except MlflowException:
            return None

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """`python mlflow_dspy.py ARGS` as a client of this stack."""
        return subprocess.run([sys.executable, str(ROOT / "mlflow_dspy.py"), *args], cwd=ROOT,
                              env=env or self.client_env(), capture_output=True, text=True, timeout=timeout)

    def bootstrap(self, name: str = MODEL, *log_options: str, env: dict[str, str] | None = None) -> str:
        """`log qa` into the server and promote its version to champion: the version."""
        self.log(f"no {name}@champion on the server: log qa and promote it")
        logged = self.cli("log", "qa", "--name", name, "--json", *log_options, env=env)
        if logged.returncode != 0:
            raise RuntimeError(f"log failed:\n{logged.stdout[-2000:]}{logged.stderr[-3000:]}")
        version = str(json.loads(logged.stdout.strip().splitlines()[-1])["version"])
        promoted = self.cli("promote", "--name", name, "--version", version, "--alias", "champion", env=env)
        if promoted.returncode != 0:
            raise RuntimeError(f"promote failed:\n{promoted.stderr[-3000:]}")
        return version

    # -- the gateway replicas -------------------------------------------------------------------------------------
    def gateway_args(self, index: int) -> list[str]:
        models = [part for uri in self.models for part in ("-m", uri)]
        return [sys.executable, str(ROOT / "mlflow_dspy.py"), "gateway", *models,
                "--reload-interval", str(self.reload_interval), "--host", "127.0.0.1",
                "--port", str(self.ports.replicas[index]), *self.gateway_options]

    def start_replica(self, index: int, wait: bool = True) -> None:
        name = self.replica_names[index]
        if self.pid(name) is None:
            self.log(f"gateway replica {name} on {self.replica_url(index)}")
            self._spawn(name, self.gateway_args(index),
                        self.client_env(MLFLOW_DSPY_FEEDBACK_SECRET=self.feedback_secret))
        if wait:
            self._wait_ready(name, f"{self.replica_url(index)}/ready")

    # -- HAProxy ----------------------------------------------------------------------------------------------------
    def haproxy_config(self) -> str:
        servers = "\n".join(f"    server {name} 127.0.0.1:{port} check"
                            for name, port in zip(self.replica_names, self.ports.replicas, strict=True))
        return f"""# Written by scripts/stack.py: the gateway replicas behind one address.
global
    maxconn 4096
    pidfile {self.pidfile('haproxy')}
    stats socket {self.folder / 'run' / 'haproxy.sock'} mode 600 level admin

defaults
    mode http
    log stdout format raw local0 err
    option dontlognull
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 10s
    timeout queue 30s

frontend gateway
    bind 127.0.0.1:{self.ports.lb}
    default_backend replicas

backend replicas
    balance roundrobin
    # A replica is in rotation while it answers /ready (its model loaded); checked every 500 ms, out after 2
    # failures, back after 2 successes. A dead replica refuses the check's connection at once; a busy one may
    # take seconds to answer it (its event loop shared with hundreds of requests): 5 s before a check fails, or
    # HAProxy would take every busy replica out and answer 503 for all.
    option httpchk GET /ready
    http-check expect status 200
    timeout check 5s
    default-server inter 500ms fastinter 250ms downinter 1s fall 2 rise 2
    # A request whose replica refused the connection or closed it without a byte of answer (killed) is sent
    # again, to another replica (redispatch), up to 3 times; the body is buffered so that it can be. (The dead
    # replica may have called the LM already: a retried chat can cost two LM calls.)
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    # Which replica answered (tests and operators read it).
    http-response set-header X-Stack-Replica %s
{servers}

listen stats
    bind 127.0.0.1:{self.ports.haproxy_stats}
    stats enable
    stats uri /stats
    stats refresh 5s
"""

    def start_haproxy(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        config = self.folder / "haproxy.cfg"
        config.write_text(self.haproxy_config())
        if self.pid("haproxy") is None:
            self.log(f"HAProxy on {self.lb_url} (stats: http://127.0.0.1:{self.ports.haproxy_stats}/stats)")
            check = subprocess.run([haproxy, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
            self._spawn("haproxy", [haproxy, "-db", "-f", str(config)])
        self._wait_ready("haproxy", f"http://127.0.0.1:{self.ports.haproxy_stats}/stats;csv",
                         expect=lambda reply: self._up_in(reply.text) == set(self.replica_names))

    @staticmethod
    def _up_in(csv: str) -> set[str]:
        rows = [line.split(",") for line in csv.splitlines() if line.startswith("replicas,")]
        return {row[1] for row in rows if row[1] != "BACKEND" and row[17].startswith("UP")}

    def replicas_up(self) -> set[str]:
        """The replicas HAProxy has in rotation now."""
        reply = httpx.get(f"http://127.0.0.1:{self.ports.haproxy_stats}/stats;csv", timeout=5, trust_env=False)
        return self._up_in(reply.text)

    # -- Prometheus -------------------------------------------------------------------------------------------------
    def prometheus_config(self) -> str:
        targets = ", ".join(f"'127.0.0.1:{port}'" for port in self.ports.replicas)
        return f"""# Written by scripts/stack.py: both gateway replicas' /metrics.
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: mlflow-dspy-gateway
    metrics_path: /metrics
    static_configs:
      - targets: [{targets}]
"""

    def start_prometheus(self) -> None:
        config = self.folder / "prometheus.yml"
        config.write_text(self.prometheus_config())
        binary = shutil.which("prometheus")
        if not self.prometheus or binary is None:
            why = "not installed" if binary is None else "off"
            self.log(f"Prometheus {why}: its scrape configuration is in {config}")
            return
        if self.pid("prometheus") is None:
            self.log(f"Prometheus on http://127.0.0.1:{self.ports.prometheus}")
            self._spawn("prometheus", [binary, f"--config.file={config}",
                                       f"--storage.tsdb.path={self.folder / 'prometheus'}",
                                       f"--web.listen-address=127.0.0.1:{self.ports.prometheus}"])
        self._wait_ready("prometheus", f"http://127.0.0.1:{self.ports.prometheus}/-/ready")

    # -- the whole ------------------------------------------------------------------------------------------------
    def up(self, bootstrap: Callable[[Stack], None] | None = None) -> Stack:
        """Start whatever is not running, in order, each once ready. Without a champion for the first model,
        `bootstrap(self)` (default: log and promote `qa` with `lm_env`) makes one first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        self.start_postgres()
        self.start_server()
        name = self.models[0].removeprefix("models:/").split("@")[0]
        if self.champion(name) is None:
            (bootstrap or (lambda stack: stack.bootstrap(name)))(self)
        for index in range(len(self.ports.replicas)):
            self.start_replica(index, wait=False)
        for index in range(len(self.ports.replicas)):
            self.start_replica(index)
        self.start_haproxy()
        self.start_prometheus()
        (self.folder / "stack.json").write_text(json.dumps(self.describe(), indent=2))
        return self

    def down(self) -> None:
        """Stop every part, in reverse order, gracefully; the database and the artifacts stay."""
        for name in ["prometheus", "haproxy", *reversed(self.replica_names), "mlflow"]:
            if self.pid(name) is not None:
                self.log(f"stopping {name}")
            self.stop(name)
        self.stop_postgres()

    def describe(self) -> dict:
        return {"folder": str(self.folder), "load_balancer": self.lb_url, "tracking_uri": self.tracking_uri,
                "database": self.database_url, "artifacts": str(self.artifacts),
                "replicas": {name: self.replica_url(i) for i, name in enumerate(self.replica_names)},
                "haproxy_stats": f"http://127.0.0.1:{self.ports.haproxy_stats}/stats",
                "prometheus": f"http://127.0.0.1:{self.ports.prometheus}", "models": list(self.models)}

    def status(self) -> dict[str, str]:
        state = {name: (f"running, pid {pid}" if (pid := self.pid(name)) else "stopped")
                 for name in ["mlflow", *self.replica_names, "haproxy", "prometheus"]}
        state["postgres"] = "running" if self._pg_ready() else "stopped"
        return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=str(ROOT / ".stack"), help="the stack's folder (default: .stack)")
    parser.add_argument("--reload-interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    stack = Stack(Path(args.dir), reload_interval=args.reload_interval)
    if args.action == "up":
        stack.up()
        print(json.dumps(stack.describe(), indent=2))
    elif args.action == "down":
        stack.down()
    else:
        print(json.dumps(stack.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
