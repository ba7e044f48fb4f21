"""Find and load logged models: URIs to runs, registered versions and programs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import dspy
from mlflow import MlflowClient

from packager.load import load_chat_model
from packager.log import use_tracking_store
from programs import ChatProgram


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
    if match := re.fullmatch(r"runs:/([^/]+)/.+", uri):
        return match.group(1), None, None
    if match := re.fullmatch(r"models:/([^/@]+)@(.+)", uri):
        found = client.get_model_version_by_alias(match.group(1), match.group(2))
        return found.run_id, found.name, str(found.version)
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        found = client.get_model_version(match.group(1), match.group(2))
        return found.run_id, found.name, str(found.version)
    raise ValueError(f"{uri!r} is not runs:/<id>/<name>, models:/<name>/<version> or models:/<name>@<alias>")


def load(uri: str) -> LoadedModel:
    run_id, name, version = resolve(uri)
    chat, metadata = load_chat_model(uri)
    return LoadedModel(uri=uri, program=metadata.get("program", ""), chat=chat, lm=dspy.settings.lm,
                       adapter=dspy.settings.adapter, run_id=run_id, registered_model=name, version=version)
