"""The LM and adapter a model was logged with, as plain JSON: what it takes to build them again, and nothing
that decides where a key is sent.

A spec names the model string, DSPy's settings of the LM (temperature, max_tokens, retries, ...) and which
engine ran it: this project's OpenAI-compatible HTTP engine, the embedded SmolLM2, or DSPy's own route. It never
holds an endpoint (`api_base`, `base_url`, `model_list`: DSPy's own rule for loaded state, since state alone
could send the serving process's key to another server) nor anything secret-named. An LM logged against an
OpenAI-compatible server records only that it was (`"endpoint": "custom"`); the serving process names the
server in `DSPY_LM_API_BASE`, and without it the model is refused rather than sent to api.openai.com.

An LM this cannot describe (a custom `BaseLM` class, a custom engine of another project) has no spec: such a
model is served from its pickle, as models logged before this format were.
"""

from __future__ import annotations

import os
from typing import Any

import dspy

from mlflow_dspy.lm_engine.credentials import clean_url, is_secret_name
from mlflow_dspy.program.problems import UserProblem

# lm_engine/select.py's: the OpenAI-compatible server the serving process calls. The engines are imported
# where a spec needs them: a model on the embedded engine never imports the HTTP one.
API_BASE_ENV = "DSPY_LM_API_BASE"

# DSPy 3.4's `dspy.predict.predict.UNSAFE_LM_STATE_KEYS`: dropped from loaded LM state.
UNSAFE_LM_KEYS = frozenset({"api_base", "base_url", "model_list"})
# dspy.LM's own constructor settings a spec keeps (beside its kwargs).
LM_SETTINGS = ("model_type", "cache", "num_retries", "finetuning_model", "launch_kwargs", "train_kwargs")
ADAPTERS = ("ChatAdapter", "JSONAdapter", "XMLAdapter")
ENGINES = ("openai-http", "embedded", "dspy")


class LMSpecProblem(UserProblem):
    """A model's LM cannot be built here as it was logged (no endpoint given for it, an unknown engine)."""


def safe(value: Any) -> Any:
    """`value` without endpoint keys or secret-named keys at any depth, and URLs without credentials."""
    if isinstance(value, dict):
        return {k: safe(v) for k, v in value.items() if k not in UNSAFE_LM_KEYS and not is_secret_name(k)}
    if isinstance(value, list | tuple):
        return [safe(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return clean_url(value)
    return value


def lm_spec(lm: dspy.BaseLM | None) -> tuple[dict[str, Any] | None, str]:
    """(the spec of `lm`, "") or (None, why it cannot be described)."""
    from mlflow_dspy.lm_engine.llama_engine import LlamaCppEngine
    from mlflow_dspy.lm_engine.openai_http import OpenAIHTTPEngine

    if lm is None:
        return None, "no LM is configured"
    if type(lm) is not dspy.LM:
        return None, f"its LM is a {type(lm).__name__}, not a dspy.LM"
    engine = getattr(lm, "engine", None)
    kwargs = dict(lm.kwargs)
    custom = bool(kwargs.get("api_base") or kwargs.get("base_url"))
    if isinstance(engine, OpenAIHTTPEngine):
        engine_spec: dict[str, Any] = {"kind": "openai-http", "timeout": engine.timeout}
        custom = custom or engine.api_base is not None
    elif isinstance(engine, LlamaCppEngine):
        engine_spec = {"kind": "embedded", **engine.dump_state()}
    elif engine is None or isinstance(engine, str):
        engine_spec = {"kind": "dspy", "name": engine or "auto"}
    else:
        return None, f"its LM runs on a custom engine ({type(engine).__name__})"
    settings = {name: getattr(lm, name) for name in LM_SETTINGS if getattr(lm, name, None) not in (None, {}, [])}
    spec = {"model": lm.model, "engine": engine_spec, "endpoint": "custom" if custom else "default",
            "settings": safe(settings), "kwargs": safe(kwargs)}
    return spec, ""


def lm_from_spec(spec: dict[str, Any], where: str = "the model") -> dspy.LM:
    """The LM `spec` describes, its endpoint (if any) from `DSPY_LM_API_BASE` in this process's environment."""
    engine = spec.get("engine") or {}
    kind = engine.get("kind")
    if kind not in ENGINES:
        raise LMSpecProblem(f"{where}: its LM runs on an engine this mlflow-dspy does not know ({kind!r})")
    api_base = os.environ.get(API_BASE_ENV) or None
    if spec.get("endpoint") == "custom" and api_base is None and kind != "embedded":
        raise LMSpecProblem(
            f"{where} was logged against an OpenAI-compatible server of its own ({spec.get('model')}); set "
            f"{API_BASE_ENV} to the server this process should call (a model never names the server its key "
            "is sent to)")
    model = str(spec["model"])
    settings = safe(spec.get("settings") or {})
    kwargs = safe(spec.get("kwargs") or {})
    if kind == "embedded":
        from mlflow_dspy.lm_engine.llama_engine import AsyncLlamaCppEngine, LlamaCppEngine

        sync = LlamaCppEngine(**{k: engine[k] for k in ("n_ctx", "default_max_tokens") if k in engine})
        return dspy.LM(model, engine=sync, async_engine=AsyncLlamaCppEngine(sync), **settings, **kwargs)
    if kind == "openai-http":
        from mlflow_dspy.lm_engine.openai_http import AsyncOpenAIHTTPEngine, OpenAIHTTPEngine

        timeout = float(engine.get("timeout") or 120.0)
        return dspy.LM(model, engine=OpenAIHTTPEngine(model, api_base, timeout),
                       async_engine=AsyncOpenAIHTTPEngine(model, api_base, timeout), **settings, **kwargs)
    name = engine.get("name") or "auto"
    route = {"api_base": api_base} if api_base else {}
    if name != "auto":
        route["engine"] = name
    return dspy.LM(model, **route, **settings, **kwargs)


def adapter_spec(adapter: Any) -> tuple[str | None, str]:
    """(the adapter's class name, or None for DSPy's default, "") or (None, why it cannot be described)."""
    if adapter is None:
        return None, ""
    name = type(adapter).__name__
    if name in ADAPTERS and type(adapter) is getattr(dspy, name):
        return name, ""
    return None, f"its adapter is a {name}, not one of DSPy's {', '.join(ADAPTERS)}"


def adapter_from_spec(name: str | None) -> Any:
    if name is None:
        return None
    if name not in ADAPTERS:
        raise LMSpecProblem(f"the model names an adapter this mlflow-dspy does not build: {name!r}")
    return getattr(dspy, name)()
