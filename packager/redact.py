"""Keep credentials out of what MLflow pickles.

The DSPy flavor pickles the program together with `dspy.settings`, LM objects
included, so an `api_key=` given to `dspy.LM` would be stored in plain bytes.
These helpers hand MLflow copies of the LMs without any credential-like
setting; the serving process reads keys from its own environment instead.
"""

from __future__ import annotations

import copy
from typing import Any

import dspy

SECRET_HINTS = ("key", "token", "secret", "password", "credential", "authorization")
HEADER_SETTINGS = ("headers", "extra_headers", "default_headers")


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(hint in lowered for hint in SECRET_HINTS)


def _clean_value(name: str, value: Any) -> Any:
    if name in HEADER_SETTINGS and isinstance(value, dict):
        return {k: v for k, v in value.items() if not is_secret_name(k)}
    return value


def scrub_lm(lm: dspy.BaseLM | None) -> dspy.BaseLM | None:
    """A copy of `lm` without credentials or call history."""
    if lm is None:
        return None
    clean = copy.copy(lm)
    clean.kwargs = {k: _clean_value(k, v) for k, v in lm.kwargs.items() if not is_secret_name(k)}
    clean.history = []
    for name in list(vars(clean)):
        if is_secret_name(name) and name != "kwargs":
            setattr(clean, name, None)
    return clean


def scrub_program(program: dspy.Module) -> dspy.Module:
    """A copy of `program` whose predictors' own LMs carry no credentials."""
    clean = program.deepcopy()
    for predictor in clean.predictors():
        if getattr(predictor, "lm", None) is not None:
            predictor.lm = scrub_lm(predictor.lm)
    return clean
