"""Which LM a program runs on: one setting, the embedded model by default.

`openai/...` models (OpenAI, or any compatible server via `DSPY_LM_API_BASE`)
run on our own HTTP engine; other providers on DSPy's built-in route.

`--lm` on the command line, else `DSPY_LM`, else the embedded SmolLM2.
`DSPY_LM_API_BASE` points a provider string at an OpenAI-compatible server.
API keys are never passed here: the provider's own environment variable
(`OPENAI_API_KEY`, ...) is read at call time, so no key is held by the LM
object that MLflow pickles.
"""

from __future__ import annotations

import os

import dspy

from mlflow_dspy.lm_engine.llama_engine import EMBEDDED_MODEL, AsyncLlamaCppEngine, LlamaCppEngine
from mlflow_dspy.lm_engine.openai_http import AsyncOpenAIHTTPEngine, OpenAIHTTPEngine

# Offline first: DSPy and LiteLLM would fetch a model-price map from the
# internet on first use; the copy bundled with them is enough.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")

LM_ENV = "DSPY_LM"
API_BASE_ENV = "DSPY_LM_API_BASE"
RETRIES = 3  # transient LM failures, retried by DSPy after 1, 2 and 4 s (or a short Retry-After)
EMBEDDED_ALIASES = {"", "embedded", "local", EMBEDDED_MODEL}


def lm_model_string(model: str | None = None) -> str:
    """The model string in force: the argument, else `DSPY_LM`, else the embedded model."""
    chosen = (model if model is not None else os.environ.get(LM_ENV, "")).strip()
    return EMBEDDED_MODEL if chosen in EMBEDDED_ALIASES else chosen


def is_embedded(lm: dspy.BaseLM) -> bool:
    return isinstance(getattr(lm, "engine", None), LlamaCppEngine)


def build_lm(model: str | None = None, api_base: str | None = None) -> dspy.LM:
    """Build the LM for `model` (see `lm_model_string`).

    Responses are not cached: a server should not hand one user's cached answer
    to another, and a cache hit would stream no tokens.
    """
    name = lm_model_string(model)
    if name == EMBEDDED_MODEL:
        engine = LlamaCppEngine()
        return dspy.LM(EMBEDDED_MODEL, engine=engine, async_engine=AsyncLlamaCppEngine(engine), cache=False)
    api_base = api_base or os.environ.get(API_BASE_ENV) or None
    if name.startswith("openai/"):
        # OpenAI and OpenAI-compatible servers: our lean HTTP engine (see lm_engine/openai_http.py).
        return dspy.LM(name, engine=OpenAIHTTPEngine(name, api_base),
                       async_engine=AsyncOpenAIHTTPEngine(name, api_base), cache=False, num_retries=RETRIES)
    extra = {"api_base": api_base} if api_base else {}
    return dspy.LM(name, cache=False, num_retries=RETRIES, **extra)


def adapter_for(lm: dspy.BaseLM) -> dspy.Adapter | None:
    """The embedded model needs JSON with a schema to answer in a parseable form;
    other LMs keep DSPy's default adapter (ChatAdapter, falling back to JSON)."""
    return dspy.JSONAdapter() if is_embedded(lm) else None


def configure_dspy(model: str | None = None, api_base: str | None = None) -> dspy.LM:
    """Configure DSPy once, for this process, with the chosen LM and its adapter."""
    lm = build_lm(model, api_base)
    dspy.configure(lm=lm, adapter=adapter_for(lm))
    return lm
