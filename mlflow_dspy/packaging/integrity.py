"""A SHA-256 digest of a logged model's files: recorded at log time, checked before unpickling.

A DSPy model is a cloudpickle: loading it runs code. `log` records the digest
of every file of the model (paths and contents) as the `model_sha256` tag of
the run and of the registered version. `serve`, `gateway` and `batch` download
the model, recompute the digest and refuse to load a model whose files differ.

What this protects against: an artifact changed after it was logged (an edited
or swapped pickle in the artifact store, a corrupted copy). What it does not:
a tracking server whose tags can be rewritten by the same person who can
rewrite artifacts, or a model that was malicious when it was logged. Keep
write access to the tracking store as narrow as access to the artifacts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from mlflow_dspy.packaging.uris import ModelUriProblem, parse_model_uri

DIGEST_TAG = "model_sha256"
ALLOW_UNVERIFIED_ENV = "MLFLOW_DSPY_ALLOW_UNVERIFIED"
# Written by MLflow when a version is registered (name and number, plain YAML,
# never executed), so it differs between a run's copy and a version's copy.
UNHASHED = {"registered_model_meta"}


class IntegrityError(RuntimeError):
    """The model's files do not match the digest recorded when it was logged (or there is none)."""


def digest(directory: str | Path) -> str:
    """SHA-256 over every file under `directory` (but `UNHASHED`): its relative path and its bytes, in order."""
    root = Path(directory)
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in UNHASHED):
        inner = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                inner.update(block)
        outer.update(path.relative_to(root).as_posix().encode() + b"\0" + inner.digest())
    return outer.hexdigest()


def recorded_digest(uri: str) -> str | None:
    """The digest recorded for `uri`: the version's tag for models:/, the run's tag for runs:/."""
    client = MlflowClient()
    try:
        parsed = parse_model_uri(uri)
    except ModelUriProblem:
        return None
    if parsed.run_id:
        return _run_digest(client, parsed.run_id)
    if parsed.model_id:
        return client.get_logged_model(parsed.model_id).tags.get(DIGEST_TAG)
    if parsed.alias:
        version = client.get_model_version_by_alias(parsed.name, parsed.alias)
    else:
        version = client.get_model_version(parsed.name, parsed.version)
    return version.tags.get(DIGEST_TAG) or (_run_digest(client, version.run_id) if version.run_id else None)


def _run_digest(client: MlflowClient, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get(DIGEST_TAG)


def verify(uri: str, local: str | Path) -> str:
    """Check the downloaded `local` copy of `uri` against its recorded digest; return the digest.

    A model with no recorded digest (a local path, a model logged elsewhere) is
    refused too, unless MLFLOW_DSPY_ALLOW_UNVERIFIED=1 says to load it anyway.
    """
    actual = digest(local)
    expected = recorded_digest(uri)
    if expected is None:
        if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
            return actual
        raise IntegrityError(f"{uri} has no recorded {DIGEST_TAG} tag, so its pickle cannot be checked before "
                             f"loading; log it with `mlflow_dspy.py log`, or set {ALLOW_UNVERIFIED_ENV}=1 "
                             "to load it unverified")
    if actual != expected:
        raise IntegrityError(f"{uri}: the model's files do not match the SHA-256 recorded when it was logged "
                             f"(expected {expected[:12]}..., found {actual[:12]}...); refusing to unpickle it")
    return actual


def download_verified(uri: str) -> str:
    """Download `uri` and verify it; the local directory that may now be loaded."""
    local = mlflow.artifacts.download_artifacts(uri)
    verify(uri, local)
    return local
