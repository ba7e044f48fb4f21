"""`mlflow models serve` on a private copy of the model, verified first.

MLflow's own server loads whatever folder it is given. This downloads the model into a directory of this
process's own (packaging/integrity.py: mode 0700, under $MLFLOW_DSPY_MODEL_COPIES or the temporary folder),
verifies that copy (its manifest, its signature under a trust key), and hands MLflow that copy: what is served
is exactly what was checked, whatever happens in the artifact store afterwards. `mlflow models serve` runs as a
child; SIGTERM, SIGINT and SIGHUP are passed on to it, and the copy is removed once it has stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from mlflow_dspy.packaging.integrity import fetch_verified
from mlflow_dspy.packaging.signing import TrustKey

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve_verified(model_uri: str, port: int, host: str = "127.0.0.1", env_manager: str = "local",
                   trust: tuple[TrustKey, ...] | None = None) -> int:
    copy = fetch_verified(model_uri, trust)  # raises IntegrityError before anything of it is loaded
    try:
        print(f"verified {model_uri} ({copy.verified.describe()}); serving the private copy {copy.path}",
              file=sys.stderr, flush=True)
        # mlflow runs uvicorn by name: this interpreter's bin directory goes first on PATH.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(copy.path), "-p", str(port), "-h",
                host, "--env-manager", env_manager]
        return run_forwarding_signals(args, env)
    finally:
        copy.release()


def run_forwarding_signals(args: list[str], env: dict[str, str]) -> int:
    """Run `args` until it ends, passing FORWARDED signals on to it; its exit code (128 + N for a signal N, as a
    shell says). It stays in this process group (a terminal's Ctrl-C reaches it as before), and on Linux it gets
    SIGTERM if this process dies first (mlflow's CLI does the same for the uvicorn it starts), so a killed
    `serve` leaves no server behind on a copy that is gone."""
    child = subprocess.Popen(args, env=env, preexec_fn=_terminate_with_parent)

    def forward(number: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in FORWARDED}
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - code if code < 0 else code


def _terminate_with_parent() -> None:
    """In the child, before it runs: SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
