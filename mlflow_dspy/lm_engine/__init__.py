"""Layer 2: the LM engines: the embedded SmolLM2 (llama.cpp), OpenAI-compatible HTTP, and the choice of LM."""

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
