"""Load a logged chat model once: one download serves both its MLmodel metadata and the program.

A model logged by this mlflow-dspy is built from its code and DSPy's JSON state (artifact/recipe.py):
nothing is unpickled. One logged before, or one whose program could not be built again from its code (its
log said so), holds only MLflow's pickle: it is loaded with `mlflow.dspy.load_model`, as before, and a warning
names the risk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import dspy
import mlflow
from mlflow.models import Model

from mlflow_dspy.artifact import recipe as recipes
from mlflow_dspy.packaging.integrity import download_verified, fetch_verified
from mlflow_dspy.packaging.paths import tracking_uri
from mlflow_dspy.packaging.signing import TrustKey
from mlflow_dspy.packaging.uris import ModelUriProblem, parse_model_uri
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.problems import UserProblem
from mlflow_dspy.runtime.host import ProgramHost

# Written into every logged model's MLmodel metadata. Models logged before the
# package moved under one namespace (no format key) pickled classes of the old
# top-level packages (`programs`, `lm_engine`): they must be logged again.
FORMAT_KEY = "mlflow_dspy_format"
FORMAT = 2

log = logging.getLogger("mlflow_dspy.packaging")
PICKLE_RISK = ("{uri} holds only a pickle (data/model.pkl): loading it runs whatever code the pickle names, so "
               "anyone who could write to the artifact store can run code in this process. Log the program again "
               "with this mlflow-dspy to serve it from its code and JSON state, with nothing unpickled")


class OutdatedModel(UserProblem):
    pass


def load_chat_model(uri: str, local: str | None = None,
                    trust: tuple[TrustKey, ...] | None = None) -> tuple[ChatProgram, dict[str, Any]]:
    """The model's chat program and its MLmodel metadata (`program`, `lm`, ...).

    `local`: a private copy already verified (packaging/integrity.py); without it, `uri` is downloaded into
    one and verified (against `trust`, default $MLFLOW_DSPY_TRUST_KEY) before anything of it is imported, and
    that copy stays until the process exits. Loading also sets `dspy.settings` (the LM and adapter the model
    was logged with): call this at start-up, never inside a request handler.
    """
    local = local or download_verified(uri, trust)
    metadata = Model.load(local).metadata or {}
    if int(metadata.get(FORMAT_KEY, 0)) < FORMAT:
        raise OutdatedModel(f"{uri} was logged by an mlflow-dspy older than 0.2 (before its code moved under the "
                            "mlflow_dspy package); log the program again")
    if recipes.has_recipe(local):
        built = recipes.build(local, uri)
        # As mlflow.dspy.load_model does with the pickled settings: the LM and adapter it was logged with.
        dspy.settings.configure(lm=built.lm, adapter=built.adapter)
        return built.chat, metadata
    log.warning(PICKLE_RISK.format(uri=uri))
    program = mlflow.dspy.load_model(local)
    if not isinstance(program, ChatProgram):
        raise OutdatedModel(f"{uri} is not a chat model logged by mlflow-dspy (it holds a "
                            f"{type(program).__name__}); log the program with `mlflow-dspy log`")
    return program, metadata


def served_name(uri: str, metadata: dict[str, Any]) -> str:
    """models:/NAME/3 and models:/NAME@alias serve as NAME; a run's model as the name it was registered under."""
    try:
        parsed = parse_model_uri(uri)
    except ModelUriProblem:
        parsed = None
    if parsed is not None and parsed.name:
        return parsed.name
    return metadata.get("registered_model") or f"dspy-{metadata.get('program') or 'model'}"


def version_of(uri: str) -> str:
    """Which version a URI names now: the registered version's number (an alias resolved), else the run id."""
    from mlflow import MlflowClient

    parsed = parse_model_uri(uri)
    if parsed.version:
        return parsed.version
    if parsed.alias:
        return str(MlflowClient().get_model_version_by_alias(parsed.name, parsed.alias).version)
    return parsed.run_id or parsed.model_id or ""


def host_for_model(uri: str, name: str | None = None, trust: tuple[TrustKey, ...] | None = None) -> ProgramHost:
    """A runtime host for a logged model, with the LM and adapter it was logged with.

    The model is downloaded into a private copy and verified there (against `trust`, default
    $MLFLOW_DSPY_TRUST_KEY) before anything of it is imported; the host's `release()` lets the copy go."""
    mlflow.set_tracking_uri(tracking_uri())
    copy = fetch_verified(uri, trust)
    try:
        # Sets dspy.settings from the artifact; this runs once at start-up, in
        # the model-loader thread, never inside a handler.
        host = _host(uri, name, str(copy.path))
    except BaseException:
        copy.release()  # its code/ leaves sys.path
        raise
    host.on_release(copy.release)
    host.files = str(copy.path)
    return host


def _host(uri: str, name: str | None, local: str) -> ProgramHost:
    program, metadata = load_chat_model(uri, local)
    version = version_of(uri)
    host = ProgramHost(program, dspy.settings.lm, dspy.settings.adapter, name or served_name(uri, metadata), uri,
                       version)
    parsed = parse_model_uri(uri)
    host.fingerprint = f"{parsed.name}/{version}" if parsed.name else version
    example = Path(local) / "input_example.json"
    if example.is_file():
        host.example = json.loads(example.read_text()).get("messages") or host.example
    return host
