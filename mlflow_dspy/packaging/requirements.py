"""The exact pins a logged model asks its serving environment for, each with its SHA-256 hashes.

The lock (requirements.txt at the top of the checkout; its copy
mlflow_dspy/requirements.txt ships in the package) gives every package
`name==version` and a `--hash=sha256:...` for each file PyPI publishes for
it. A logged model's requirements.txt carries them one line per package, so
the pip that MLflow runs to build the model's own environment
(`pip install -r requirements.txt`) is in hash-checking mode by itself: it
installs only files whose hash is in the lock.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from mlflow_dspy.packaging.paths import REQUIREMENTS_FILE
from mlflow_dspy.program.problems import UserProblem


def _logical_lines(text: str) -> list[str]:
    """The lines pip reads: `\\`-continued lines joined, comments and blank lines dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


def locked_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Every entry of the lock as one line: `name==version --hash=sha256:... ...` (options lines skipped)."""
    entries = []
    for line in _logical_lines(path.read_text()):
        if line.startswith("-"):
            continue
        pin = line.split(" ", 1)[0]
        if "==" not in pin:
            raise ValueError(f"{path.name}: {pin!r} is not an exact pin (name==version)")
        entries.append(line)
    return entries


def pinned_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Every `name==version` of a requirements file (hashes, comments and option lines skipped)."""
    return [entry.split(" ", 1)[0] for entry in locked_requirements(path)]


def hashes_of(entry: str) -> list[str]:
    """The `sha256:...` values of one requirement line's `--hash` options."""
    return re.findall(r"--hash[= ](\S+)", entry)


class RequirementsProblem(UserProblem):
    """A user's requirements file that cannot join the runtime's pins; the message names both pins."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def user_entries(path: Path) -> list[tuple[int, Requirement, list[str]]]:
    """The requirements of a user's file: (line number, requirement, its `--hash` values); comments,
    blank lines and pip option lines skipped, `\\`-continued lines joined (numbered by their first line)."""
    if not path.is_file():
        raise RequirementsProblem(f"requirements file not found: {path}")
    found = []
    pending, first = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = "" if raw.lstrip().startswith("#") else raw.split(" #", 1)[0].strip()
        first = first or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending, start, first = (pending + line).strip(), "", first, 0
        if not line or line.startswith("-"):
            continue
        specifier = re.split(r"\s+--", line, maxsplit=1)[0].strip()
        try:
            found.append((start, Requirement(specifier), hashes_of(line)))
        except InvalidRequirement as exc:
            raise RequirementsProblem(f"{path.name} line {start}: {line!r} is not a requirement ({exc})") from None
    return found


def user_requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a user's file (comments, blank lines, hashes and pip options skipped)."""
    return [requirement for _, requirement, _ in user_entries(path)]


WHEELHOUSE = Path.home() / ".cache" / "mlflow-dspy" / "wheelhouse"  # the Makefile's, unless $WHEELHOUSE


def local_build_hashes(wheelhouse: Path | None = None) -> dict[str, list[str]]:
    """`name==version` -> the SHA-256 of wheels built on this machine (llama-cpp-python, which PyPI has only as
    source), from the records `make wheels` writes beside them (`<hash>  <wheel file>` lines)."""
    folder = wheelhouse or Path(os.environ.get("WHEELHOUSE") or WHEELHOUSE)
    found: dict[str, list[str]] = {}
    for record in sorted(folder.glob("*.sha256")) if folder.is_dir() else []:
        for line in record.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]) and parts[1].endswith(".whl"):
                name, version = parts[1].split("-")[:2]
                found.setdefault(f"{_canonical(name)}=={version}", []).append(f"sha256:{parts[0]}")
    return found


def _with_local_builds(entries: list[str]) -> list[str]:
    """A wheel built here is one more hash its pin accepts: the model's own environment on this machine takes
    it from the wheelhouse (pip prefers a wheel) instead of building the sdist again (minutes); anywhere else
    pip finds only PyPI's files, checked against PyPI's hashes as before."""
    local = local_build_hashes()
    out = []
    for entry in entries:
        pin = entry.split(" ", 1)[0]
        name, _, version = pin.partition("==")
        extra = [h for h in local.get(f"{_canonical(name)}=={version}", []) if h not in hashes_of(entry)]
        out.append(" ".join([entry, *(f"--hash={value}" for value in extra)]))
    return out


def model_requirements(user_file: Path | None = None) -> list[str]:
    """The runtime's exact pins with their hashes, plus the user's own; a user pin that the runtime's
    pinned version does not satisfy is a conflict, named with both pins.

    pip's hash-checking mode is all or nothing: one line with a hash makes every
    line need one. So a user's line for another package keeps the hashes it
    carries, and if one has none, the model's requirements are the pins alone
    (no hashes anywhere) and a note on stderr names the line."""
    entries = _with_local_builds(locked_requirements())
    if user_file is None:
        return entries
    runtime = {_canonical(line.split("==")[0]): line.split(" ", 1)[0] for line in entries}
    extra: list[tuple[str, list[str]]] = []
    unhashed = []
    for number, requirement, hashes in user_entries(user_file):
        pinned = runtime.get(_canonical(requirement.name))
        if pinned is None:
            extra.append((str(requirement), hashes))
            if not hashes:
                unhashed.append(f"line {number} ({requirement})")
            continue
        version = pinned.split("==", 1)[1]
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            raise RequirementsProblem(
                f"{user_file.name} asks for {requirement} but mlflow-dspy's runtime pins {pinned}; "
                "the two cannot be installed together"
            )
    if unhashed:
        print(f"note: {user_file.name} {', '.join(unhashed)} has no --hash, so this model's requirements are "
              "pinned but not hash-checked (pip checks all or none); give every line its hashes "
              "(e.g. `uv pip compile --generate-hashes`) to have them checked", file=sys.stderr)
        return [line.split(" ", 1)[0] for line in entries] + [requirement for requirement, _ in extra]
    return entries + [" ".join([requirement, *(f"--hash={value}" for value in hashes)])
                      for requirement, hashes in extra]
