"""DSPy's callback dispatch, with each event's handler remembered instead of found again.

For every module, adapter and LM call, DSPy picks each callback's handler
(`on_module_start`, `on_lm_end`, ...) by a chain of `isinstance` checks, one of
them against `dspy.CodeInterpreter`, a runtime-checkable Protocol, which walks
the protocol's attributes on every check. Profiled with the gateway's trace
recorder as the one callback: the two lookups per event were a quarter of the
recording's CPU. The handler depends only on the callback's class, the
instance's class and the method called, so it is looked up once per such key
and remembered; what DSPy would pick is what is picked (tested), and anything
whose choice could depend on the instance itself (a `supports_decision_requests`
attribute on something that is not an LM) is always asked of DSPy.

`install()` replaces `dspy.utils.callback._get_on_start_handler` and
`_get_on_end_handler`, which DSPy's `with_callbacks` looks up at each call;
tests/test_internals_dspy_callbacks.py pins their source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy
import dspy.utils.callback as dspy_callback

from mlflow_dspy.internals import speedups_enabled

PATCHED = ("_get_on_start_handler", "_get_on_end_handler")
ORIGINALS: dict[str, Callable] = {name: getattr(dspy_callback, name) for name in PATCHED}


def install() -> bool:
    """Remember DSPy's handler choices (once per process); with the speed-ups off, leave DSPy's own.
    Says whether the remembering lookups are in place."""
    if not speedups_enabled():
        return False
    for name in PATCHED:
        if not getattr(getattr(dspy_callback, name), "remembers", False):
            setattr(dspy_callback, name, remembering(ORIGINALS[name]))
    return True


def uninstall() -> None:
    for name in PATCHED:
        setattr(dspy_callback, name, ORIGINALS[name])


def remembering(choose: Callable[[Any, Any, Callable], Callable]) -> Callable[[Any, Any, Callable], Callable]:
    """`choose(callback, instance, fn)` (a bound handler), asked once per (callback class, instance class, method)."""
    names: dict[tuple[type, type, str], str] = {}

    def handler(callback: Any, instance: Any, fn: Callable) -> Callable:
        key = (type(callback), type(instance), fn.__name__)
        name = names.get(key)
        if name is None:
            chosen = choose(callback, instance, fn)
            if not isinstance(instance, dspy.BaseLM) and hasattr(instance, "supports_decision_requests"):
                return chosen  # DSPy's choice may depend on this instance's attribute: not remembered
            name = names[key] = chosen.__name__
        return getattr(callback, name)

    handler.remembers = True
    return handler
