"""Language models: the embedded SmolLM2 engine and the choice of LM."""

from mlflow_dspy.lm_engine.llama_engine import EMBEDDED_MODEL, AsyncLlamaCppEngine, LlamaCppEngine
from mlflow_dspy.lm_engine.select import build_lm, configure_dspy, lm_model_string

__all__ = [
    "EMBEDDED_MODEL",
    "AsyncLlamaCppEngine",
    "LlamaCppEngine",
    "build_lm",
    "configure_dspy",
    "lm_model_string",
]
