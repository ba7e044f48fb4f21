"""The one parser of model URIs: `runs:/<id>/<path>`, `models:/<name>/<version>`,
`models:/<name>@<alias>` and MLflow 3's `models:/<model id>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow_dspy.program.problems import UserProblem

USAGE = "runs:/<run id>/model, models:/<name>/<version> or models:/<name>@<alias>"


class ModelUriProblem(UserProblem):
    pass


@dataclass(frozen=True)
class ModelUri:
    uri: str
    run_id: str | None = None
    name: str | None = None  # a registered model's name
    version: str | None = None
    alias: str | None = None
    model_id: str | None = None  # a logged model's id (models:/m-...)

    @property
    def registered(self) -> bool:
        return self.name is not None


def parse_model_uri(uri: str) -> ModelUri:
    if match := re.fullmatch(r"runs:/([^/]+)/(.+)", uri):
        return ModelUri(uri, run_id=match.group(1))
    if match := re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri):
        return ModelUri(uri, name=match.group(1), alias=match.group(2))
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        return ModelUri(uri, name=match.group(1), version=match.group(2))
    if match := re.fullmatch(r"models:/(m-[0-9a-f]+)", uri):
        return ModelUri(uri, model_id=match.group(1))
    raise ModelUriProblem(f"{uri!r} is not a model URI; use {USAGE}")
