"""`mlflow models serve`, on a copy of the model whose SHA-256 was checked first.

MLflow's own server unpickles whatever the URI holds. This downloads the
model, verifies it against the digest recorded at log time, and hands MLflow
that verified local copy, so what is served is exactly what was checked.
"""

from __future__ import annotations

import os
import sys

from mlflow_dspy.packaging.integrity import download_verified


def serve_verified(model_uri: str, port: int, host: str = "127.0.0.1", env_manager: str = "local") -> int:
    local = download_verified(model_uri)  # raises IntegrityError on a mismatch
    print(f"verified {model_uri}; serving {local}", file=sys.stderr, flush=True)
    # mlflow runs uvicorn by name: this interpreter's bin directory goes first on PATH.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", local, "-p", str(port), "-h", host,
            "--env-manager", env_manager]
    os.execvpe(args[0], args, env)  # replaced: signals reach mlflow directly
    return 0  # not reached
