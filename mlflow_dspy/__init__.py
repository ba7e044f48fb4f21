"""mlflow-dspy: ship a DSPy program with MLflow: log it with its code and data, version it, serve it.

The Python API (imported lazily, so `import mlflow_dspy` stays instant):

    import mlflow_dspy

    # log a program object (or a reference, a project program, an example)
    logged = mlflow_dspy.log_program(my_program, name="triage", dev="data/dev.jsonl",
                                     metric="support_desk.metrics:exact")
    logged.model_uri, logged.registered_model, logged.version, logged.dev_score

    # load a logged chat model: a dspy.Module that answers OpenAI chat messages
    chat = mlflow_dspy.load_chat_model("models:/dspy-triage@champion")
    chat(messages=[{"role": "user", "content": "My invoice is wrong"}])

The package is layered; each room imports only from the rooms below it:

1. `program`   - references, project files, the chat mapping, data and metrics
2. `lm_engine` - the LM engines (the embedded SmolLM2, OpenAI-compatible HTTP)
   `internals` - the speed-ups and limits built on DSPy's and uvicorn's private internals, behind one switch
3. `runtime`   - running a loaded program: hosting, streaming, scoring
   `artifact`  - a logged model built from its code and JSON state (no pickle); travels in the model's code/
4. `packaging` - log, register, promote, load, integrity, requirements
5. `gateway`, `batch`, `lifecycle` - the OpenAI-compatible server, batch scoring, eval/optimize/init
6. `cli`       - the `mlflow-dspy` command
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["ChatMapping", "ChatProgram", "LoggedModel", "load_chat_model", "log_program", "resolve_target"]

_LAZY = {
    "ChatMapping": "mlflow_dspy.program.mapping",
    "ChatProgram": "mlflow_dspy.program.chat",
    "resolve_target": "mlflow_dspy.program.project",
    "LoggedModel": "mlflow_dspy.packaging.log",
    "log_program": "mlflow_dspy.api",
    "load_chat_model": "mlflow_dspy.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlflow_dspy' has no attribute {name!r}")
