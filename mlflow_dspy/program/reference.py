"""Resolve a program reference (`pkg.module:attr` or `path/to/file.py:attr`) to a `dspy.Module`.

`attr` may be a `dspy.Module` instance, a `dspy.Module` subclass that builds
with no arguments, or a function with no required arguments that returns a
`dspy.Module`. The same mechanics resolve a metric (`module:function`).

A reference that cannot be resolved raises `ReferenceProblem`: one line that
names what is missing (the file, the module, the attribute) or what is of the
wrong type. The command line prints it and exits 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import dspy

from mlflow_dspy.program.problems import UserProblem


class ReferenceProblem(UserProblem):
    """A reference that names nothing usable; the message is one line for the user."""


@dataclass(frozen=True)
class Source:
    """Where a resolved program's code lives: what `log` copies into the artifact's code paths.

    `path` is the single file (`file.py:attr`, or a top-level module) or the
    root folder of the local package the module belongs to.
    """

    module: str  # the module name the program's classes are pickled under
    path: Path | None  # None: installed in the environment (site-packages), nothing to copy


@dataclass(frozen=True)
class Resolved:
    value: Any
    module: ModuleType
    source: Source


def split_reference(reference: str) -> tuple[str, str]:
    target, sep, attr = reference.rpartition(":")
    # A Windows drive letter ("C:\\x.py") has no attribute after it.
    if not sep or not target or not attr or not attr.replace(".", "").replace("_", "").isalnum():
        raise ReferenceProblem(
            f"{reference!r} is not a program reference; use package.module:attr or path/to/file.py:attr"
        )
    return target, attr


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ReferenceProblem(f"file not found: {path}")
    if path.suffix != ".py":
        raise ReferenceProblem(f"{path.name}: a program file must be a Python file (.py)")
    name = path.stem
    if not name.isidentifier():
        raise ReferenceProblem(f"{path.name}: a program file needs a name that is a Python identifier")
    if name in sys.stdlib_module_names or name in ("dspy", "mlflow", "mlflow_dspy"):
        # Its module name would shadow that library for the whole process (and in the served model).
        raise ReferenceProblem(f"{path.name}: rename the file; {name!r} is the name of a module it would hide")
    folder = str(path.parent)
    # The file's own folder is importable, so it can import its neighbours and
    # its classes pickle under a module name that the artifact's code path serves.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == path:
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_module(name: str, base_dir: Path | None) -> ModuleType:
    folder = str((base_dir or Path.cwd()).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # a user's project: importable from its folder, as `python -c` would be
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise ReferenceProblem(
                f"module not found: {exc.name!r} (looked in {folder} and the environment)"
            ) from None
        raise


def source_of_module(module: ModuleType, file_reference: bool = False) -> Source:
    """Where a module's code lives: the file, or the root folder of its local package; None when installed."""
    file = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    if file is None or _installed(file):
        return Source(module.__name__, None)
    if file_reference:
        return Source(module.__name__, file)
    top = module.__name__.split(".")[0]
    if top == module.__name__ and file.name != "__init__.py":
        return Source(module.__name__, file)
    package = sys.modules[top]
    roots = list(getattr(package, "__path__", []))
    return Source(module.__name__, Path(roots[0]).resolve() if roots else file)


def _installed(file: Path) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in file.parts)


def resolve_attribute(reference: str, base_dir: Path | None = None) -> Resolved:
    """The object a reference names, with its module and source (no type check)."""
    target, attr = split_reference(reference)
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if is_file:
        path = Path(target)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        module = _load_file(path.resolve())
    else:
        module = _import_module(target, base_dir)
    value: Any = module
    for part in attr.split("."):
        if not hasattr(value, part):
            where = getattr(module, "__file__", None) or module.__name__
            raise ReferenceProblem(f"{reference}: {Path(where).name if is_file else target} has no attribute {part!r}")
        value = getattr(value, part)
    return Resolved(value, module, source_of_module(module, is_file))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {getattr(value, '__name__', '')}".strip()


def build_module(value: Any, reference: str) -> dspy.Module:
    """A `dspy.Module` from an instance, a no-argument subclass, or a no-argument factory."""
    if isinstance(value, dspy.Module):
        return value
    if inspect.isclass(value):
        if not issubclass(value, dspy.Module):
            raise ReferenceProblem(f"{reference}: class {value.__name__} is not a dspy.Module subclass")
        _check_no_required_arguments(value.__init__, reference, skip_self=True)
        return value()
    if callable(value):
        _check_no_required_arguments(value, reference)
        built = value()
        if not isinstance(built, dspy.Module):
            raise ReferenceProblem(
                f"{reference}: the function returned a {type(built).__name__}, not a dspy.Module"
            )
        return built
    raise ReferenceProblem(
        f"{reference}: a {_describe(value)} is not a program; name a dspy.Module instance, a dspy.Module "
        "subclass, or a function that returns one"
    )


def _check_no_required_arguments(function: Callable, reference: str, skip_self: bool = False) -> None:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return
    if skip_self and parameters:
        parameters = parameters[1:]
    required = [p.name for p in parameters
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ReferenceProblem(f"{reference}: it needs arguments ({', '.join(required)}); "
                               "name something that builds with none")


def resolve_program(reference: str, base_dir: Path | None = None) -> tuple[dspy.Module, Source]:
    """The program a reference names, built, and where its code lives."""
    resolved = resolve_attribute(reference, base_dir)
    return build_module(resolved.value, reference), resolved.source


def resolve_function(reference: str, base_dir: Path | None = None, what: str = "metric") -> Callable:
    """A function a reference names (a metric: `(example, prediction, trace=None)`)."""
    resolved = resolve_attribute(reference, base_dir)
    if not callable(resolved.value) or inspect.isclass(resolved.value):
        raise ReferenceProblem(f"{reference}: a {what} must be a function, got {_describe(resolved.value)}")
    return resolved.value
