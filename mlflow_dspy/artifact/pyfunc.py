"""The `python_function` loader of a model logged by mlflow-dspy (its MLmodel's `loader_module`).

`mlflow models serve`, `mlflow.pyfunc.load_model` and MLflow's own check of the input example at log time
load the model through this: the program is built from the artifact's code and DSPy's JSON state
(artifact/recipe.py), so they run with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` too. The answer is MLflow's
DSPy chat wrapper's, as when the flavor unpickled it: `{"choices": [...]}` with the prediction as JSON.
"""

from __future__ import annotations

from typing import Any

from mlflow_dspy.artifact.recipe import build


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> Any:
    from mlflow.dspy.wrapper import DspyChatModelWrapper

    built = build(path)
    # The settings MLflow's wrapper enters for each call (a dspy.context): the LM and adapter, nothing else.
    return DspyChatModelWrapper(built.chat, {"lm": built.lm, "adapter": built.adapter}, model_config)
