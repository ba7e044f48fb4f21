"""Layer 2: the LM engines: the embedded SmolLM2 (llama.cpp), OpenAI-compatible HTTP, and the choice of LM.

The names below load on first use, so a light module of this room (the
embedded model's settings, read by the command line) does not import DSPy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EMBEDDED_MODEL": "mlflow_dspy.lm_engine.llama_engine",
    "AsyncLlamaCppEngine": "mlflow_dspy.lm_engine.llama_engine",
    "LlamaCppEngine": "mlflow_dspy.lm_engine.llama_engine",
    "build_lm": "mlflow_dspy.lm_engine.select",
    "configure_dspy": "mlflow_dspy.lm_engine.select",
    "lm_model_string": "mlflow_dspy.lm_engine.select",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
