"""A logged program built back from its code and DSPy's JSON state: nothing is unpickled.

Beside MLflow's DSPy flavor (whose `data/model.pkl` `mlflow.dspy.load_model` still reads), `log` writes:

- `data/program_recipe.json`: how to build the program again: `build`, a `module:attr` importable from the
  artifact's `code/` (the program's class, its builder function, or an instance, as the reference named it),
  the chat options and the chat mapping they gave at log time, and the LM and adapter as plain specs
  (artifact/lm.py: no endpoint, no key);
- `data/program_state.json`: DSPy's own JSON state of the program (`module.save("....json")`: signatures,
  instructions, demos), with every LM state in it stripped of `api_base`, `base_url`, `model_list` and
  anything secret-named;
- `data/program_files/`: for a program whose build does work of its own (an index over a corpus), the files
  it saved with its `save_files(folder)` at log time; it is then built by its class's `from_files(folder)`.

Loading imports `build` from the artifact's own code, builds the program, loads the state with DSPy's loader
(which refuses endpoints and custom LM classes in state), reads the chat mapping again from the program and
checks it against the one recorded. `log` does the same round trip before anything is written, and logs a
program it cannot rebuild exactly as before: with its pickle alone, and a note that says why.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import dspy

from mlflow_dspy.artifact.lm import adapter_from_spec, adapter_spec, lm_from_spec, lm_spec, safe
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.mapping import ChatMapping
from mlflow_dspy.program.problems import UserProblem
from mlflow_dspy.program.reference import build_module

RECIPE_FILE = "data/program_recipe.json"
STATE_FILE = "data/program_state.json"
FILES_DIR = "data/program_files"
RECIPE_FORMAT = 1
# Never imported afresh from a model's code/: the package serving it (its runtime copy in code/ is for
# `mlflow models serve` in an environment without mlflow-dspy) and the libraries under it.
SHARED_PACKAGES = {"mlflow_dspy", "dspy", "mlflow"}


class ArtifactProblem(UserProblem):
    """A model's files that do not build into the program they were logged from."""


@dataclass(frozen=True)
class Recipe:
    build: str  # module:attr in the artifact's code/
    files: bool  # built by build.from_files(data/program_files)
    question_field: str | None
    context_field: str | None
    answer_field: str | None
    mapping: dict[str, Any]  # ChatMapping.describe() at log time
    lm: dict[str, Any]
    adapter: str | None
    format: int = RECIPE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Recipe:
        try:
            data = json.loads(text)
            if data.get("format") != RECIPE_FORMAT:
                raise ArtifactProblem(f"{where}: {RECIPE_FILE} has format {data.get('format')!r}; this mlflow-dspy "
                                      f"reads format {RECIPE_FORMAT}")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ArtifactProblem(f"{where}: {RECIPE_FILE} cannot be read ({type(exc).__name__})") from None


@dataclass
class Built:
    """A program built from a model's files, and the LM and adapter it was logged with."""

    chat: ChatProgram
    lm: dspy.BaseLM
    adapter: Any


def saves_files(module: dspy.Module) -> bool:
    """The program keeps what its build made in files of its own: `save_files(folder)`, `from_files(folder)`."""
    return callable(getattr(type(module), "save_files", None)) and callable(getattr(type(module), "from_files", None))


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def program_state(module: dspy.Module) -> dict[str, Any]:
    """DSPy's JSON state of `module` as `module.save("x.json")` writes it, every LM state in it made safe."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program_state.json"
        module.save(str(path))
        state = json.loads(path.read_text())
    return _safe_lms(state)


def _safe_lms(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (safe(v) if k == "lm" and isinstance(v, dict) else _safe_lms(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_lms(v) for v in value]
    return value


def _comparable(state: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in state.items() if k != "metadata"}, sort_keys=True, default=str)


@dataclass
class Planned:
    """What `log` writes beside the flavor, worked out (and rebuilt once, as a check) before any run exists."""

    recipe: Recipe
    state: dict[str, Any]
    program: dspy.Module  # the program whose state and files are written


def plan(module: dspy.Module, build: str | None, rebuild: Callable[[], dspy.Module] | None, mapping: ChatMapping,
         options: tuple[str | None, str | None, str | None], lm: dspy.BaseLM, adapter: Any) -> tuple[
             Planned | None, str]:
    """(what to write, "") or (None, why the program cannot be served without its pickle).

    `build` and `rebuild` name and do the same thing from the user's own code: the program's skeleton, into
    which its state is loaded and compared with the program's own (a recipe that rebuilds something else is
    no recipe)."""
    lm_json, why = lm_spec(lm)
    if lm_json is None:
        return None, why
    adapter_name, why = adapter_spec(adapter)
    if why:
        return None, why
    files = saves_files(module)
    if files:
        build = class_path(type(module))
    if build is None or (rebuild is None and not files):
        return None, f"a {type(module).__name__} built with arguments cannot be built again from its code"
    state = program_state(module)
    try:
        if files:
            with tempfile.TemporaryDirectory() as tmp:
                module.save_files(Path(tmp))
                skeleton = type(module).from_files(Path(tmp))
        else:
            skeleton = rebuild()
        if not isinstance(skeleton, dspy.Module):
            return None, f"{build} builds a {type(skeleton).__name__}, not a dspy.Module"
        skeleton = skeleton.deepcopy()
        skeleton.load_state(state)
    except Exception as exc:  # the user's code: whatever it raises, the model is logged as before
        return None, f"building {build} again and loading its state failed ({type(exc).__name__}: {exc})"
    if type(skeleton) is not type(module) or _comparable(program_state(skeleton)) != _comparable(state):
        return None, f"{build} builds a program whose state differs from the one logged"
    question, context, answer = options
    recipe = Recipe(build=build, files=files, question_field=question, context_field=context, answer_field=answer,
                    mapping=json.loads(json.dumps(mapping.describe())), lm=lm_json, adapter=adapter_name)
    return Planned(recipe, state, module), ""


def write(model_dir: Path, planned: Planned) -> None:
    """The recipe, the state and the program's own files, into a model's folder (the flavor's, before upload)."""
    (model_dir / "data").mkdir(parents=True, exist_ok=True)
    (model_dir / STATE_FILE).write_text(json.dumps(planned.state, indent=2, sort_keys=True) + "\n")
    if planned.recipe.files:
        folder = model_dir / FILES_DIR
        folder.mkdir(parents=True)
        planned.program.save_files(folder)
    (model_dir / RECIPE_FILE).write_text(planned.recipe.to_json())


def has_recipe(model_dir: str | Path) -> bool:
    return (Path(model_dir) / RECIPE_FILE).is_file()


# Top-level modules this process imported from a model's code/ folder, and that folder.
_imported_from: dict[str, Path] = {}


def import_from(code: Path, name: str) -> ModuleType:
    """`name`, imported from a model's `code/` folder.

    A module the model carries and that was imported from another model's code (a version loaded before) is
    imported again from this one, so each version runs its own code. One this process imported itself (the
    program being logged, an example served from its code) is used as it is."""
    top = name.split(".")[0]
    carried = (code / top).is_dir() or (code / f"{top}.py").is_file()
    if carried and top not in SHARED_PACKAGES:
        before = _imported_from.get(top)
        if top in sys.modules and before is not None and before != code:
            for key in [k for k in sys.modules if k == top or k.startswith(f"{top}.")]:
                del sys.modules[key]
        if top not in sys.modules:
            _imported_from[top] = code
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    importlib.invalidate_caches()
    return importlib.import_module(name)


def _built_program(recipe: Recipe, model_dir: Path, where: str) -> dspy.Module:
    module_name, _, attr = recipe.build.partition(":")
    try:
        value: Any = import_from(model_dir / "code", module_name)
        for part in attr.split("."):
            value = getattr(value, part)
        if recipe.files:
            program = value.from_files(model_dir / FILES_DIR)
        else:
            program = build_module(value, recipe.build)
            if program is value:  # an instance: this load's own copy
                program = program.deepcopy()
    except UserProblem:
        raise
    except Exception as exc:
        raise ArtifactProblem(f"{where}: building {recipe.build} from the model's code failed "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(program, dspy.Module):
        raise ArtifactProblem(f"{where}: {recipe.build} built a {type(program).__name__}, not a dspy.Module")
    return program


def build(model_dir: str | Path, where: str | None = None) -> Built:
    """The chat program a model's folder holds, built from its code and state, with its LM and adapter."""
    model_dir = Path(model_dir)
    where = where or str(model_dir)
    recipe = Recipe.from_json((model_dir / RECIPE_FILE).read_text(), where)
    program = _built_program(recipe, model_dir, where)
    try:
        state = json.loads((model_dir / STATE_FILE).read_text())
        program.load_state(state)  # DSPy's loader: no endpoint keys, no custom LM classes
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactProblem(f"{where}: {STATE_FILE} does not load into {recipe.build} "
                              f"({type(exc).__name__}: {exc})") from None
    mapping = ChatMapping.of(program, recipe.question_field, recipe.context_field, recipe.answer_field)
    if json.loads(json.dumps(mapping.describe())) != recipe.mapping:
        raise ArtifactProblem(f"{where}: the program built from its code reads chats differently from the one "
                              "logged (its chat mapping changed)")
    lm = lm_from_spec(recipe.lm, where)
    return Built(ChatProgram(program, mapping), lm, adapter_from_spec(recipe.adapter))
