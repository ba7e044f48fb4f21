"""The exact pins a logged model asks its serving environment for."""

from __future__ import annotations

from pathlib import Path

from packager.paths import REQUIREMENTS_FILE


def pinned_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Every `name==version` line of requirements.txt (comments and options skipped)."""
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" not in line:
            raise ValueError(f"{path.name}: {line!r} is not an exact pin (name==version)")
        pins.append(line)
    return pins
