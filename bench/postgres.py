"""A throwaway PostgreSQL cluster in a temporary directory, for the tests and the bench of what is written to a
PostgreSQL tracking store: the team stack's own PostgreSQL part (scripts/stack.py: Debian's binaries, trust
authentication on 127.0.0.1, the `postgres` user when the caller is root) on a free port, fsync off, removed
after."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.processes import free_port
from scripts.stack import PG_BIN, Ports, Stack


def binaries() -> str | None:
    """The PostgreSQL installation's bin directory the stack uses, or None."""
    return str(PG_BIN) if (PG_BIN / "initdb").exists() else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster; yields its server's SQLAlchemy URI (`postgresql+psycopg2://postgres@127.0.0.1:<port>`,
    psycopg2 being the driver this project locks)."""
    home = Path(tempfile.mkdtemp(prefix="mlflow-dspy-pg-"))
    home.chmod(0o755)  # the cluster's owner must reach its folder
    stack = Stack(home, Ports(postgres=free_port()), postgres_options="-F", log=lambda line: None)
    try:
        stack.start_postgres()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{stack.ports.postgres}"
    finally:
        stack.stop_postgres()
        shutil.rmtree(home, ignore_errors=True)


def new_database(server_uri: str) -> str:
    """A new, empty database on the cluster; its URI."""
    import psycopg2

    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(f"{server_uri.replace('+psycopg2', '')}/postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return f"{server_uri}/{name}"
