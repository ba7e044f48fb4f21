"""Load a logged chat model once: one download serves both its MLmodel metadata and the program."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.models import Model

from packager.integrity import download_verified
from programs import ChatProgram


def load_chat_model(uri: str) -> tuple[ChatProgram, dict[str, Any]]:
    """The model's chat program and its MLmodel metadata (`program`, `lm`, ...).

    `mlflow.dspy.load_model` also sets `dspy.settings` from the artifact:
    call this at start-up, never inside a request handler.
    """
    local = download_verified(uri)  # the pickle is checked against its logged SHA-256 before it runs
    metadata = Model.load(local).metadata or {}
    program = mlflow.dspy.load_model(local)
    if not isinstance(program, ChatProgram):
        program = ChatProgram(program)
    return program, metadata
