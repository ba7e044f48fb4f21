"""The limits on a request's header section (enforced in uvicorn_protocol), kept light to import.

Each limit is one of the gateway's settings (declared, with its flag and help,
in mlflow_dspy/gateway/config.py, whose table takes its default and its
variable from here); workers, being processes, read them from the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HEADER_LINE_BYTES_ENV = "MLFLOW_DSPY_MAX_HEADER_LINE_BYTES"
HEADER_BYTES_ENV = "MLFLOW_DSPY_MAX_HEADER_BYTES"
HEADER_TIMEOUT_ENV = "MLFLOW_DSPY_HEADER_TIMEOUT"


@dataclass(frozen=True)
class HeaderLimits:
    max_header_line_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0

    @classmethod
    def from_env(cls) -> HeaderLimits:
        """The limits the environment sets; a variable unset or empty keeps its default."""
        defaults = cls()
        return cls(max_header_line_bytes=_read(HEADER_LINE_BYTES_ENV, int, defaults.max_header_line_bytes),
                   max_header_bytes=_read(HEADER_BYTES_ENV, int, defaults.max_header_bytes),
                   header_timeout=_read(HEADER_TIMEOUT_ENV, float, defaults.header_timeout))


def _read(name: str, kind: type, default: int | float) -> int | float:
    raw = os.environ.get(name, "").strip()
    return kind(raw) if raw else default
