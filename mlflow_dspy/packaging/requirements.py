"""The exact pins a logged model asks its serving environment for."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from mlflow_dspy.packaging.paths import REQUIREMENTS_FILE
from mlflow_dspy.program.problems import UserProblem


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


class RequirementsProblem(UserProblem):
    """A user's requirements file that cannot join the runtime's pins; the message names both pins."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def user_requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a user's file (comments, blank lines and pip options skipped)."""
    if not path.is_file():
        raise RequirementsProblem(f"requirements file not found: {path}")
    found = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            found.append(Requirement(line))
        except InvalidRequirement as exc:
            raise RequirementsProblem(f"{path.name} line {number}: {line!r} is not a requirement ({exc})") from None
    return found


def model_requirements(user_file: Path | None = None) -> list[str]:
    """The runtime's exact pins, plus the user's own; a user pin that the runtime's pinned
    version does not satisfy is a conflict, named with both pins."""
    pins = pinned_requirements()
    if user_file is None:
        return pins
    runtime = {_canonical(line.split("==")[0]): line for line in pins}
    extra = []
    for requirement in user_requirements(user_file):
        pinned = runtime.get(_canonical(requirement.name))
        if pinned is None:
            extra.append(str(requirement))
            continue
        version = pinned.split("==", 1)[1]
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            raise RequirementsProblem(
                f"{user_file.name} asks for {requirement} but mlflow-dspy's runtime pins {pinned}; "
                "the two cannot be installed together"
            )
    return pins + extra
