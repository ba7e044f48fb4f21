"""A tracking store with `qa` logged and registered: made once a run through the CLI, then read by many
tests; a test that changes a registry works on a copy.

A copy is the store's folder (mlflow.db and mlartifacts/) copied, with the absolute artifact locations MLflow
keeps in the database (experiments, runs, logged models, model versions) moved to the copy. The model files are
copied byte for byte: each MLmodel still names the original folder in its informational `artifact_path` (MLflow
loads from the locations in the database, and the files must keep the SHA-256 recorded when they were logged).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cli import store_env

# Where the database keeps absolute paths to the artifacts (MLflow 3.17's SQLite schema).
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                    ("model_versions", "source"))


@dataclass
class Registry:
    root: Path
    logged: list[dict] = field(default_factory=list)  # each `log --json` answer, in version order
    log_output: list[str] = field(default_factory=list)  # what each `log` printed (stdout and stderr)

    RECORD = "registry.json"  # what `log` answered and printed, for the workers that did not log it

    def write(self) -> None:
        (self.root / self.RECORD).write_text(json.dumps({"logged": self.logged, "log_output": self.log_output}))

    @classmethod
    def read(cls, root: Path) -> Registry:
        record = json.loads((root / cls.RECORD).read_text())
        return cls(root, record["logged"], record["log_output"])

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        return store_env(self.root, **extra)

    def model_uri(self, version: int = 1) -> str:
        """The run's model (runs:/...) of a version."""
        return self.logged[version - 1]["model_uri"]

    def copy(self, dest: Path) -> Registry:
        """A registry of its own at `dest`, with the same runs, versions, aliases and tags."""
        shutil.copytree(self.root, dest, ignore=shutil.ignore_patterns("*.log"))
        old, new = f"{self.root}/", f"{dest}/"  # in file:// URIs and plain paths alike
        with sqlite3.connect(dest / "mlflow.db") as db:
            for table, column in LOCATION_COLUMNS:
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))
            left = [(t, c) for t, c in LOCATION_COLUMNS
                    if db.execute(f"SELECT count(*) FROM {t} WHERE {c} LIKE ?", (f"%{self.root}/%",)).fetchone()[0]]
        assert not left, f"a copied registry still points at the original in {left}"
        db.close()
        return Registry(dest, list(self.logged), list(self.log_output))

    def fingerprint(self) -> str:
        """A digest of what the registry holds (its database rows and every artifact file): unchanged by reads."""
        digest = hashlib.sha256()
        with sqlite3.connect(f"file:{self.root / 'mlflow.db'}?mode=ro", uri=True) as db:
            for table in ("runs", "tags", "params", "metrics", "registered_models", "model_versions",
                          "model_version_tags", "registered_model_aliases", "trace_info", "logged_models"):
                for row in sorted(map(repr, db.execute(f"SELECT * FROM {table}"))):
                    digest.update(row.encode())
        db.close()
        for path in sorted((self.root / "mlartifacts").rglob("*")):
            # MLflow itself rewrites a model's registered_model_meta each time a models:/ URI is loaded
            # (a local store hands out its own folder): a read, not a change.
            if path.is_file() and path.name != "registered_model_meta":
                digest.update(str(path.relative_to(self.root)).encode() + path.read_bytes())
        return digest.hexdigest()
