"""Keep credentials out of what MLflow pickles.

The DSPy flavor pickles the program together with `dspy.settings`, LM objects
included, so an `api_key=` given to `dspy.LM` would be stored in plain bytes.
These helpers hand MLflow copies without any credential-like setting: every
LM found in the program's modules, in the settings, and nested dicts of
headers or request options. The serving process reads keys from its own
environment instead.
"""

from __future__ import annotations

import copy
from typing import Any

import dspy

from mlflow_dspy.lm_engine.credentials import clean_url, is_secret_name


def clean(value: Any) -> Any:
    """Drop secret-named keys at any depth of dicts and lists; strip secrets from URLs."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not is_secret_name(k)}
    if isinstance(value, list | tuple):
        return type(value)(clean(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return clean_url(value)
    return value


def scrub_lm(lm: dspy.BaseLM | None) -> dspy.BaseLM | None:
    """A copy of `lm` without credentials or call history."""
    if lm is None:
        return None
    scrubbed = copy.copy(lm)
    scrubbed.kwargs = clean(dict(lm.kwargs))
    scrubbed.history = []
    for name, value in list(vars(scrubbed).items()):
        if name in ("kwargs", "history"):
            continue
        if is_secret_name(name):
            setattr(scrubbed, name, None)
        elif isinstance(value, dict):
            setattr(scrubbed, name, clean(value))
    return scrubbed


def _scrub_attributes(module: dspy.Module) -> None:
    for name, value in list(vars(module).items()):
        if isinstance(value, dspy.BaseLM):
            setattr(module, name, scrub_lm(value))


def scrub_program(program: dspy.Module) -> dspy.Module:
    """A copy of `program` in which every LM held by any of its modules carries no credentials."""
    scrubbed = program.deepcopy()
    _scrub_attributes(scrubbed)
    for _, module in scrubbed.named_sub_modules():
        _scrub_attributes(module)
    return scrubbed


def scrub_settings(lm: dspy.BaseLM, adapter: Any) -> dict[str, Any]:
    """Overrides for `dspy.context` while MLflow copies `dspy.settings` into the pickle.

    Only the LM and the adapter are needed to serve; callbacks (an observability
    client holds its own key), a retrieval model and an adapter's own LM are not
    carried over with their credentials.
    """
    overrides: dict[str, Any] = {"lm": scrub_lm(lm), "adapter": adapter, "callbacks": [], "rm": None}
    if adapter is not None:
        adapter = copy.copy(adapter)
        _scrub_attributes(adapter)
        overrides["adapter"] = adapter
    return overrides
