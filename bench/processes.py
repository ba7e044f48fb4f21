"""Real server processes for the benchmark and the tests: free ports, start, wait until ready, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**overrides: str) -> dict[str, str]:
    """The test's environment with the venv first on PATH (mlflow runs uvicorn by name)."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT)
    env.update(overrides)
    return env


@contextmanager
def running(
    args: Sequence[str], ready_url: str, env: dict[str, str], log: Path, timeout: float = 180,
    headers: dict[str, str] | None = None, cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start `args`, wait for `ready_url` to answer 200, and stop the whole process group after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=cwd or ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2, headers=headers).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready_url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- CPU of process trees (/proc) ----------------------------------------------------------------------------------
def process_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, user + system CPU seconds so far)} of every live process, from one walk of /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended during the walk
    return found


def children(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """The live children of `pid`."""
    table = process_table() if table is None else table
    return [child for child, (parent, _) in table.items() if parent == pid]


def tree_cpu(root: int, table: dict[int, tuple[int, float]] | None = None) -> float:
    """CPU seconds of `root` and its live descendants (one walk of /proc unless `table` is given)."""
    table = process_table() if table is None else table
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo.extend(children(pid, table))
    return total
