"""The embedded model's serving settings, and the environment that carries them to every process.

Read once per process, when the embedded model is first used. Light on
purpose (no DSPy, no llama.cpp): each is also one of the gateway's settings
(mlflow_dspy/gateway/config.py declares its flag and help, and takes its
variable, default and least value from here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PARALLEL_ENV = "MLFLOW_DSPY_EMBEDDED_PARALLEL"
CACHE_MB_ENV = "MLFLOW_DSPY_EMBEDDED_CACHE_MB"
QUEUE_ENV = "MLFLOW_DSPY_EMBEDDED_QUEUE"
THREADS_ENV = "MLFLOW_DSPY_EMBEDDED_THREADS"
LEAST = {PARALLEL_ENV: 1, CACHE_MB_ENV: 0, QUEUE_ENV: 0, THREADS_ENV: 1}  # the smallest value each may take
DEFAULT_CACHE_MB = 64.0
QUEUE_PER_SEQUENCE = 8  # requests that may wait, per sequence, unless set


def default_parallel() -> int:
    """Sequences decoded together by default: two per core, from 2 to 8 (4 on a 2-core machine)."""
    return min(8, max(2, 2 * (os.cpu_count() or 1)))


def default_threads() -> int:
    """llama.cpp's threads by default: one per CPU this process may run on (its affinity, which `taskset` and
    container CPU sets narrow), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EmbeddedSettings:
    parallel: int  # sequences decoded together in one llama context
    cache_mb: float  # the prompt-prefix cache; 0 turns it off
    queue: int  # requests that may wait for a sequence; past it they are refused (429)
    threads: int = 0  # llama.cpp's threads for decoding and prompts (0: `default_threads()`)

    @classmethod
    def from_env(cls) -> EmbeddedSettings:
        parallel = _number(PARALLEL_ENV, default_parallel(), int)
        return cls(parallel=parallel, cache_mb=_number(CACHE_MB_ENV, DEFAULT_CACHE_MB, float),
                   queue=_number(QUEUE_ENV, QUEUE_PER_SEQUENCE * parallel, int),
                   threads=_number(THREADS_ENV, default_threads(), int))

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * (1 << 20))


def _number(name: str, default: Any, kind: Callable[[str], Any]) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if value < LEAST[name]:
        raise ValueError(f"{name} must be at least {LEAST[name]:g}, not {raw}")
    return value
