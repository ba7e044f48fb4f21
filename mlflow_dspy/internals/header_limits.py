"""The limits on a request's header section (enforced in uvicorn_protocol), kept light to import:
the command line reads their defaults, and workers read them from the environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

LIMITS_ENV = "MLFLOW_DSPY_HEADER_LIMITS"


@dataclass(frozen=True)
class HeaderLimits:
    max_header_line_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> HeaderLimits:
        return cls(**json.loads(os.environ.get(LIMITS_ENV, "{}")))
