"""The flavor module `log` hands `mlflow.models.Model.log`: MLflow's DSPy flavor, then what serves it pickle-free.

`mlflow.dspy.log_model(...)` is `Model.log(flavor=mlflow.dspy, ...)`; `log` calls `Model.log` with this module
instead, the same arguments otherwise (`task="llm/v1/chat"` among them). Its `save_model` first runs
`mlflow.dspy.save_model` unchanged (the `dspy` flavor, `data/model.pkl`, the pins, the signature), then writes
the recipe, the JSON state and the program's own files (artifact/recipe.py) and points the `python_function`
flavor at this project's loader in the artifact's code, `mlflow_dspy.artifact.pyfunc`. Every file it adds is an
ordinary file of the model folder, uploaded with the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import Model

from mlflow_dspy.artifact.recipe import Planned, write

LOADER_MODULE = "mlflow_dspy.artifact.pyfunc"
PYFUNC = "python_function"


def save_model(path: str, mlflow_model: Model | None = None, pickle_free: Planned | None = None,
               **kwargs: Any) -> None:
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    mlflow.dspy.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    if pickle_free is None:
        return
    folder = Path(path)
    write(folder, pickle_free)
    mlflow_model.flavors[PYFUNC]["loader_module"] = LOADER_MODULE
    mlflow_model.model_size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    mlflow_model.save(str(folder / "MLmodel"))
