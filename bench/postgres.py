"""A throwaway PostgreSQL cluster in a temporary directory, for the tests and the bench of what is written to a
PostgreSQL tracking store: PostgreSQL's own binaries (initdb, pg_ctl), trust authentication on 127.0.0.1 and a
free port, fsync off, removed after. As root (PostgreSQL refuses to run as root) the cluster runs as the
`postgres` user."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from bench.processes import free_port


def binaries() -> str | None:
    """The newest PostgreSQL installation's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(found[-1]) if found else None


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Start a cluster; yields its server's SQLAlchemy URI (`postgresql+psycopg2://postgres@127.0.0.1:<port>`,
    psycopg2 being the driver this project locks), without a database."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    home = tempfile.mkdtemp(prefix="mlflow-dspy-pg-")
    data = os.path.join(home, "data")
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(_as_owner([f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
                       check=True, capture_output=True)
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -F -c max_connections=50"
        subprocess.run(_as_owner([f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", f"{home}/log", "-w",
                                  "start"]), check=True, capture_output=True)
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run(_as_owner([f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"]),
                           capture_output=True)
    finally:
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
