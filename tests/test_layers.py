"""The package's rooms import only from the rooms below them (see mlflow_dspy/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_dspy"
LAYER = {"program": 1, "lm_engine": 2, "internals": 2, "runtime": 3, "artifact": 3, "packaging": 4, "gateway": 5,
         "batch": 5, "lifecycle": 5, "cli": 6, "api": 6}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mlflow_dspy" and parts[1] in LAYER else None


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_no_room_imports_a_room_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        room = relative.parts[0].removesuffix(".py")
        if room not in LAYER:
            continue
        for module in imports(path):
            other = room_of(module)
            if other and LAYER[other] > LAYER[room]:
                upward.append(f"{relative} imports {module}")
    assert not upward, "\n".join(upward)


def test_the_layer_rule_would_catch_an_upward_import(tmp_path):
    # The check is not vacuous: the parser sees a function-level import of a higher room.
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from mlflow_dspy.gateway.app import create_app\n")
    assert [room_of(m) for m in imports(sample)] == ["gateway"]


def test_nothing_outside_the_package_is_imported_by_it():
    generic = {"programs", "serving", "packager", "lm_engine", "lifecycle", "batch", "bench", "tests"}
    offenders = [f"{p.relative_to(PACKAGE)}: {m}" for p in PACKAGE.rglob("*.py") for m in imports(p)
                 if m.split(".")[0] in generic]
    assert not offenders, offenders


def test_batch_and_eval_run_programs_without_the_http_gateway():
    for room in ("batch", "lifecycle"):
        for path in (PACKAGE / room).rglob("*.py"):
            assert not [m for m in imports(path) if room_of(m) == "gateway"], path


def test_the_private_internals_room_imports_nothing_else_of_ours():
    # It is the one place that leans on DSPy's and uvicorn's internals: the rooms above choose what to use.
    for path in (PACKAGE / "internals").rglob("*.py"):
        assert {room_of(m) for m in imports(path)} <= {None, "internals"}, path
