"""Find and load logged models: URIs to runs, registered versions and programs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dspy
from mlflow import MlflowClient

from mlflow_dspy.packaging.load import load_chat_model
from mlflow_dspy.packaging.log import use_tracking_store
from mlflow_dspy.packaging.signing import TrustKey
from mlflow_dspy.packaging.uris import parse_model_uri
from mlflow_dspy.program.chat import ChatProgram


@dataclass
class LoadedModel:
    uri: str
    program: str  # the registry name it was logged from
    chat: ChatProgram
    lm: dspy.BaseLM
    adapter: Any
    run_id: str
    registered_model: str | None = None
    version: str | None = None


def resolve(uri: str) -> tuple[str, str | None, str | None]:
    """(run_id, registered name, version) of a runs:/ or models:/ URI."""
    use_tracking_store()
    client = MlflowClient()
    parsed = parse_model_uri(uri)
    if parsed.run_id:
        return parsed.run_id, None, None
    if parsed.model_id:
        return client.get_logged_model(parsed.model_id).source_run_id, None, None
    if parsed.alias:
        found = client.get_model_version_by_alias(parsed.name, parsed.alias)
    else:
        found = client.get_model_version(parsed.name, parsed.version)
    return found.run_id, found.name, str(found.version)


def load(uri: str, trust: tuple[TrustKey, ...] | None = None) -> LoadedModel:
    """The model `uri` names, verified on a private copy first (against `trust`, default $MLFLOW_DSPY_TRUST_KEY)."""
    run_id, name, version = resolve(uri)
    chat, metadata = load_chat_model(uri, trust=trust)
    return LoadedModel(uri=uri, program=metadata.get("program", ""), chat=chat, lm=dspy.settings.lm,
                       adapter=dspy.settings.adapter, run_id=run_id, registered_model=name, version=version)
