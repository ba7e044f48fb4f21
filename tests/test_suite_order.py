"""The order in which `make test` hands test modules to its workers: the longest first (tests/conftest.py), from
the times tests/module_seconds.json records, guessed from a module's kind when it is not there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MODULE_SECONDS, _heaviest_modules_first

pytestmark = pytest.mark.unit


@dataclass
class Item:
    nodeid: str
    marks: set[str] = field(default_factory=set)

    def get_closest_marker(self, name: str):
        return name if name in self.marks else None


def test_every_module_the_times_name_exists():
    root = Path(__file__).parent.parent
    named = json.loads(MODULE_SECONDS.read_text())
    assert named and not [module for module in named if not (root / module).is_file()]


def test_modules_go_longest_first_and_unknown_ones_by_their_kind(monkeypatch, tmp_path):
    times = tmp_path / "module_seconds.json"
    times.write_text(json.dumps({"tests/test_b.py": 500, "tests/test_c.py": 20}))
    monkeypatch.setattr("tests.conftest.MODULE_SECONDS", times)
    items = [Item("tests/test_a.py::one", {"unit"}), Item("tests/test_c.py::one", {"embedded"}),
             Item("tests/test_b.py::one", {"e2e"}), Item("tests/test_d.py::one", {"e2e"}),
             Item("tests/test_d.py::two", {"embedded"}), Item("tests/test_b.py::two", {"e2e"})]
    _heaviest_modules_first(items)
    # b (500 s, known), d (unknown: its embedded test guesses 150 s), c (known: 20 s, whatever its kind), a.
    assert [item.nodeid for item in items] == ["tests/test_b.py::one", "tests/test_b.py::two", "tests/test_d.py::one",
                                               "tests/test_d.py::two", "tests/test_c.py::one", "tests/test_a.py::one"]
