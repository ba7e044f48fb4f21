"""The copy of the checkout a wheel is built from (tests/support/venv.py) leaves out everything git ignores:
a local run's leftovers (a team stack's sockets in .stack/, stores, logs) must neither break the copy nor
travel into the wheel."""

from __future__ import annotations

from tests.support.processes import ROOT
from tests.support.venv import SOURCE_IGNORE


def ignored_entries() -> list[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def test_the_source_copy_skips_every_entry_of_gitignore():
    samples = {entry: entry.replace("*", "sample") for entry in ignored_entries()}
    skipped = SOURCE_IGNORE(str(ROOT), list(samples.values()))
    assert ".stack" in samples and "mlflow.db" in samples  # the file is read as meant
    assert {entry for entry, name in samples.items() if name not in skipped} == set()


def test_the_check_would_catch_an_entry_the_copy_keeps():
    assert "kept-file.txt" not in SOURCE_IGNORE(str(ROOT), ["kept-file.txt"])
