"""What a command is asked to work on: a program, its data, its metric and its chat choices.

A program is named in one of three ways, tried in this order:

1. a reference, `package.module:attr` or `path/to/file.py:attr` (anything with a colon);
2. a name declared in the user's project file: the nearest `pyproject.toml`,
   from the current directory up, with a `[tool.mlflow-dspy.programs.NAME]` table;
3. the name of a bundled example (`qa`, `assistant`, `rag`, `classify`), which
   are declared the same way, in the examples' own `pyproject.toml`.

A project table holds, per program (every key but `program` optional; paths are
relative to the project file):

    [tool.mlflow-dspy.programs.triage]
    program = "support_desk.triage:Triage"   # the reference
    registered-name = "support-triage"       # default: dspy-<name>
    dev = "data/dev.jsonl"
    train = "data/train.jsonl"
    metric = "support_desk.metrics:exact"    # default: every output field, trimmed and case-folded
    lm = "openai/gpt-4o-mini"                # default: $DSPY_LM, else the embedded model
    question-field = "ticket"
    context-field = "policy"
    answer-field = "category"
    requirements = "requirements.txt"        # the program's own pins, added to the runtime's
    description = "Routes support tickets."
    example = "My invoice is wrong"           # the input example MLflow stores
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlflow_dspy.program.problems import UserProblem
from mlflow_dspy.program.reference import ReferenceProblem, split_reference

TABLE = "mlflow-dspy"
KEYS = {
    "program": "reference",
    "registered-name": "registered_name",
    "dev": "dev",
    "train": "train",
    "metric": "metric",
    "lm": "lm",
    "question-field": "question_field",
    "context-field": "context_field",
    "answer-field": "answer_field",
    "requirements": "requirements",
    "description": "description",
    "example": "example",
}
PATH_KEYS = ("dev", "train", "requirements")


class ProjectProblem(UserProblem):
    """A project file that cannot be read as it stands; the message names the file and the key."""


@dataclass(frozen=True)
class ProgramConfig:
    """Everything a command needs to know about one program. Paths are absolute."""

    name: str
    reference: str
    base_dir: Path = field(default_factory=Path.cwd)  # where relative references resolve from
    registered_name: str | None = None
    dev: Path | None = None
    train: Path | None = None
    metric: str | None = None
    lm: str | None = None
    question_field: str | None = None
    context_field: str | None = None
    answer_field: str | None = None
    requirements: Path | None = None
    description: str | None = None
    example: str | None = None
    origin: str = "reference"  # "reference", the project file's path, or "example"
    home: str = ""  # where the program comes from (its top package, or its project): names it apart, if need be

    @property
    def model_name(self) -> str:
        """The registered model's name: the configured one, else dspy-<name>. A user's program whose name is
        a bundled example's is never registered under that example's name: dspy-<home>-<name> instead."""
        if self.registered_name:
            return self.registered_name
        home = kebab_case(self.home).strip("-")
        if self.origin != "example" and self.name in example_names() and home:
            return f"dspy-{home}-{self.name}"
        return f"dspy-{self.name}"

    def with_options(self, **options: Any) -> ProgramConfig:
        """This config with the command line's options on top (None leaves a value as it is)."""
        given = {k: v for k, v in options.items() if v is not None}
        for key in PATH_KEYS:
            if key in given:
                given[key] = Path(given[key]).resolve()
        return replace(self, **given)


def kebab_case(text: str) -> str:
    """`ChatWithHistory` -> chat-with-history; acronyms stay whole: `RAG` -> rag, `HTTPServer` -> http-server."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", text).replace("_", "-").lower()


def home_of_reference(reference: str) -> str:
    """The top package of `pkg.module:attr`, or the folder of `file.py:attr`."""
    target, _ = split_reference(reference)
    if target.endswith(".py"):
        return Path(target).resolve().parent.name
    return target.split(".")[0]


def name_of_reference(reference: str) -> str:
    """`support_desk.triage:Triage` -> triage; `agent.py:build_agent` -> build-agent."""
    target, attr = split_reference(reference)
    last = attr.split(".")[-1]
    if last in ("build", "program", "make", "create", "main"):
        last = Path(target).stem if target.endswith(".py") else target.split(".")[-1]
    return kebab_case(last)


def find_project_file(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml with a [tool.mlflow-dspy] table, from `start` (the cwd) upwards.

    Files that cannot be read as TOML are passed over here (an unrelated folder
    above the project must not stop the search); reading a chosen one names its errors."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        try:
            if candidate.is_file() and TABLE in _read(candidate).get("tool", {}):
                return candidate
        except (ProjectProblem, OSError, UnicodeDecodeError):
            continue
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProjectProblem(f"{path}: not valid TOML: {exc}") from None


def _project_name(path: Path) -> str:
    """A project's own name: its [project] name, else its folder's."""
    name = _read(path).get("project", {}).get("name")
    return name if isinstance(name, str) and name else path.parent.name


def read_project(path: Path, origin: str | None = None) -> dict[str, ProgramConfig]:
    """The programs a project file declares, by name."""
    table = _read(path).get("tool", {}).get(TABLE, {})
    programs = table.get("programs", {})
    if not isinstance(programs, dict):
        raise ProjectProblem(f"{path}: [tool.{TABLE}.programs] must be a table of programs")
    unknown_top = sorted(set(table) - {"programs"})
    if unknown_top:
        raise ProjectProblem(f"{path}: unknown key [tool.{TABLE}].{unknown_top[0]}; programs go under "
                             f"[tool.{TABLE}.programs.NAME]")
    base = path.parent.resolve()
    configs = {}
    for name, entry in programs.items():
        where = f"{path}: [tool.{TABLE}.programs.{name}]"
        if not isinstance(entry, dict):
            raise ProjectProblem(f"{where} must be a table")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise ProjectProblem(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(KEYS)}")
        if "program" not in entry:
            raise ProjectProblem(f"{where} has no 'program' (the reference, e.g. package.module:Class)")
        values: dict[str, Any] = {}
        for key, value in entry.items():
            if not isinstance(value, str):
                raise ProjectProblem(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            values[KEYS[key]] = (base / value).resolve() if key in PATH_KEYS else value
        configs[name] = ProgramConfig(name=name, base_dir=base, origin=origin or str(path),
                                      home=_project_name(path), **values)
    return configs


def examples_dir() -> Path:
    """The bundled examples: inside the installed package, or `programs/` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "examples"
    return installed if (installed / "pyproject.toml").is_file() else package.parent / "programs"


def examples() -> dict[str, ProgramConfig]:
    return read_project(examples_dir() / "pyproject.toml", origin="example")


@functools.cache
def example_names() -> frozenset[str]:
    """The bundled examples' names (each registers as dspy-<name>)."""
    return frozenset(examples())


def resolve_target(target: str, start: Path | None = None) -> ProgramConfig:
    """The program `target` names: a reference, a project program, or an example."""
    if ":" in target:
        split_reference(target)  # a malformed reference is named as one
        return ProgramConfig(name=name_of_reference(target), reference=target, base_dir=(start or Path.cwd()),
                             home=home_of_reference(target))
    project = find_project_file(start)
    declared = read_project(project) if project else {}
    if target in declared:
        return declared[target]
    bundled = examples()
    if target in bundled:
        return bundled[target]
    known = f"; {project} declares: {', '.join(sorted(declared))}" if declared else ""
    raise ReferenceProblem(
        f"unknown program {target!r}: not a reference (package.module:attr or file.py:attr), "
        f"not an example ({', '.join(sorted(bundled))}){known}"
    )
