"""A tracking-store plugin for `mlflow server`: MLflow's own SQL store, whose `log_spans` writes the new traces
of a batch as rows in one transaction (internals/mlflow_sql_traces.py) instead of MLflow's ORM work per row.

    mlflow server --backend-store-uri mlflow-dspy+sqlite:///mlflow.db
    mlflow server --backend-store-uri mlflow-dspy+postgresql+psycopg2://user:password@host:5432/mlflow

Through MLflow's public plugin mechanism: the entry points `mlflow-dspy+sqlite` and `mlflow-dspy+postgresql`
(also with `+psycopg2` or `+psycopg`, the driver SQLAlchemy is to use: plain `postgresql://` means psycopg 3
to SQLAlchemy 2.1, and this project locks psycopg2-binary) of the groups `mlflow.tracking_store` and
`mlflow.model_registry_store` (pyproject.toml), which MLflow loads when it is imported. The tracking store is a
`SqlAlchemyStore` on the URI without `mlflow-dspy+` (the same database, tables and migrations: the plain URI
opens it again at any time); the model registry is MLflow's own on that URI. The OTLP route (`POST /v1/traces`,
where the gateway's writer sends its batches) calls the store's `log_spans`; everything else is MLflow's code.
MLflow's server jobs (prompt optimization, scheduled scorers) ask for a database URI they know
(`extract_db_type_from_uri`): with this scheme the server starts without them, with a warning.

What it leans on beyond the plugin mechanism: `SqlAlchemyStore` itself (subclassed; `log_spans`'s signature),
and what mlflow_sql_traces.py leans on. Anything that path does not write as MLflow would (another shape of
trace, a trace already stored, rollups or workspaces on, `MLFLOW_DSPY_SPEEDUPS=0`, any failure) goes through
MLflow's own `log_spans`. tests/test_internals_mlflow_store_plugin.py checks the entry points and compares
the rows with `log_spans`'s.

This module is imported with MLflow (entry points are loaded as MLflow's store registries are built): it imports
nothing of MLflow at the top.
"""

from __future__ import annotations

import functools
from typing import Any

PREFIX = "mlflow-dspy+"
SCHEMES = ("mlflow-dspy+sqlite", "mlflow-dspy+postgresql", "mlflow-dspy+postgresql+psycopg2",
           "mlflow-dspy+postgresql+psycopg")


def database_uri(store_uri: str) -> str:
    """The SQLAlchemy URI under a plugin URI: `mlflow-dspy+sqlite:///x.db` -> `sqlite:///x.db`."""
    if not store_uri.startswith(PREFIX):
        raise ValueError(f"not an mlflow-dspy store URI: {store_uri.split('://')[0]}://...")
    return store_uri[len(PREFIX):]


def tracking_store(store_uri: str, artifact_uri: str | None = None) -> Any:
    """The `mlflow.tracking_store` entry point: the tracking store for a `mlflow-dspy+<database>://` URI."""
    import os

    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.tracking._tracking_service import utils

    uri = database_uri(store_uri)
    if MLFLOW_ENABLE_WORKSPACES.get():
        return utils._get_sqlalchemy_store(uri, artifact_uri)  # MLflow's own workspace-aware store, as it is
    if artifact_uri is None:  # as MLflow's own builder: the server's artifact root, else the local default
        artifact_uri = os.environ.get(utils._SERVER_ARTIFACT_ROOT_ENV_VAR, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    return _store_class()(uri, artifact_uri)


def registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """The `mlflow.model_registry_store` entry point: MLflow's own model registry on the database under the URI
    (`mlflow server` uses its backend store URI for the registry too)."""
    from mlflow.tracking._model_registry.utils import _get_sqlalchemy_store

    return _get_sqlalchemy_store(database_uri(store_uri))


@functools.cache
def _store_class() -> type:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from mlflow_dspy.internals.mlflow_sql_traces import row_writer

    class FastSpansStore(SqlAlchemyStore):
        """MLflow's SQL store; `log_spans` writes a batch of new traces as rows in one transaction."""

        def log_spans(self, location: str, spans: list, tracking_uri: Any = None) -> list:
            if spans and (writer := self._row_writer()) is not None:
                try:
                    if writer.write_spans(location, spans):
                        return spans
                except Exception:
                    pass  # MLflow's own log_spans then writes the batch (over what exists), or raises
            return super().log_spans(location, spans, tracking_uri=tracking_uri)

        def _row_writer(self) -> Any:
            from mlflow_dspy.internals import speedups_enabled

            if not speedups_enabled():
                return None
            if not hasattr(self, "_mlflow_dspy_rows"):
                self._mlflow_dspy_rows = row_writer(self)
            return self._mlflow_dspy_rows

    return FastSpansStore
