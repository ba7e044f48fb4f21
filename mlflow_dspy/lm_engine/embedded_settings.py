"""The embedded model's serving settings, and the environment that carries them to every process.

Read once per process, when the embedded model is first used. Light on
purpose (no DSPy, no llama.cpp): the command line reads its defaults here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PARALLEL_ENV = "MLFLOW_DSPY_EMBEDDED_PARALLEL"
CACHE_MB_ENV = "MLFLOW_DSPY_EMBEDDED_CACHE_MB"
QUEUE_ENV = "MLFLOW_DSPY_EMBEDDED_QUEUE"
DEFAULT_CACHE_MB = 64.0
QUEUE_PER_SEQUENCE = 8  # requests that may wait, per sequence, unless set


def default_parallel() -> int:
    """Sequences decoded together by default: two per core, from 2 to 8 (4 on a 2-core machine)."""
    return min(8, max(2, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class EmbeddedSettings:
    parallel: int  # sequences decoded together in one llama context
    cache_mb: float  # the prompt-prefix cache; 0 turns it off
    queue: int  # requests that may wait for a sequence; past it they are refused (429)

    @classmethod
    def from_env(cls) -> EmbeddedSettings:
        parallel = _number(PARALLEL_ENV, default_parallel(), int, 1)
        return cls(parallel=parallel, cache_mb=_number(CACHE_MB_ENV, DEFAULT_CACHE_MB, float, 0),
                   queue=_number(QUEUE_ENV, QUEUE_PER_SEQUENCE * parallel, int, 0))

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * (1 << 20))


def _number(name: str, default: Any, kind: Callable[[str], Any], least: float) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if value < least:
        raise ValueError(f"{name} must be at least {least:g}, not {raw}")
    return value


def settings_environment(parallel: int | None = None, cache_mb: float | None = None,
                         queue: int | None = None) -> dict[str, str]:
    """The variables that give every process serving the embedded model these settings (None: the default)."""
    env = {}
    if parallel is not None:
        env[PARALLEL_ENV] = str(parallel)
    if cache_mb is not None:
        env[CACHE_MB_ENV] = f"{cache_mb:g}"
    if queue is not None:
        env[QUEUE_ENV] = str(queue)
    return env
