"""The tracking-store plugin for `mlflow server` (internals/mlflow_store_plugin.py): its entry points are
declared and MLflow builds the plugin's store from them; its `log_spans`, given the spans MLflow's OTLP route
parses from the gateway writer's requests, writes the very rows MLflow's own `log_spans` writes, every table
compared, on SQLite and on PostgreSQL (a throwaway cluster), as the gateway writer's own rows
(internals/mlflow_sql_traces.py) do on PostgreSQL; and it leaves to MLflow's `log_spans` what it does not know."""

from __future__ import annotations

import copy
import importlib.metadata
import inspect

import pytest
from mlflow.entities import Span
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracing.client import TracingClient

from bench.postgres import binaries, new_database, postgres_cluster
from bench.store_plugin import declared_entry_points, entry_points_path
from bench.trace_throughput import otlp_body, parsed_spans, qa_records
from mlflow_dspy.internals.mlflow_sql_traces import records_writer
from mlflow_dspy.internals.mlflow_store_plugin import SCHEMES, registry_store, tracking_store
from mlflow_dspy.internals.mlflow_traces import span_dicts
from tests.support.mlflow_rows import assert_same_rows, table_rows
from tests.test_internals_mlflow_traces import TOKEN_USAGE, _varied_records, a_record

GROUPS = {"mlflow.tracking_store": tracking_store, "mlflow.model_registry_store": registry_store}


def parsed(records) -> list[Span]:
    """The spans MLflow's OTLP route hands its store for the writer's request with these records (its parse)."""
    return parsed_spans(otlp_body(records))


def two_stores(make_uri, tmp_path) -> tuple[tuple[SqlAlchemyStore, str, str], tuple[SqlAlchemyStore, str, str]]:
    """MLflow's own store and the plugin's, on two new databases, each with one experiment: (store, uri, id)."""
    stores = []
    for plugin in (False, True):
        uri = make_uri()
        artifacts = str(tmp_path / "artifacts")  # the same root: the same artifact-location tags
        store = tracking_store(f"mlflow-dspy+{uri}", artifacts) if plugin else SqlAlchemyStore(uri, artifacts)
        stores.append((store, uri, store.create_experiment("traces")))
    return stores[0], stores[1]


# -- the entry points ------------------------------------------------------------------------------------------
def test_the_entry_points_are_declared_and_mlflow_builds_the_plugin_store_from_them(tmp_path, monkeypatch):
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    declared = declared_entry_points()
    for group, builder in GROUPS.items():
        assert set(declared.get(group, {})) == set(SCHEMES), f"pyproject.toml's {group} entry points"
        for name, value in declared[group].items():
            assert importlib.metadata.EntryPoint(name, value, group).load() is builder
    monkeypatch.syspath_prepend(str(entry_points_path(tmp_path / "meta")))  # as pip install writes them
    tracking, registry = TrackingStoreRegistry(), ModelRegistryStoreRegistry()
    tracking.register_entrypoints()  # MLflow's own plugin loading (mlflow.utils.plugins.get_entry_points)
    registry.register_entrypoints()
    uri = f"mlflow-dspy+sqlite:///{tmp_path / 'mlflow.db'}"
    store = tracking.get_store(uri, str(tmp_path / "artifacts"))
    assert isinstance(store, SqlAlchemyStore) and type(store).__name__ == "FastSpansStore"
    assert store.db_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore

    assert isinstance(registry.get_store(uri), RegistryStore)
    assert list(inspect.signature(SqlAlchemyStore.log_spans).parameters)[1:] == ["location", "spans", "tracking_uri"]


# -- the rows, SQLite -------------------------------------------------------------------------------------------
def test_the_plugin_writes_the_very_rows_log_spans_writes_from_the_otlp_spans(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_DSPY_SPEEDUPS", raising=False)
    names = iter(range(2))
    (stock, stock_uri, stock_experiment), (plugin, plugin_uri, plugin_experiment) = two_stores(
        lambda: f"sqlite:///{tmp_path / f'{next(names)}.db'}", tmp_path)
    records = _varied_records() + qa_records(3)
    stock.log_spans(stock_experiment, parsed(records))
    writer = plugin._row_writer()
    assert writer is not None, "the plugin's fast path no longer finds what it needs in MLflow: see its imports"
    assert writer.write_spans(plugin_experiment, parsed(records)), "it declined traces of the gateway's shape"
    assert_same_rows(stock_uri, plugin_uri)


def test_the_plugin_leaves_to_log_spans_what_it_does_not_know(tmp_path, monkeypatch):
    names = iter(range(4))
    (stock, stock_uri, stock_experiment), (plugin, plugin_uri, plugin_experiment) = two_stores(
        lambda: f"sqlite:///{tmp_path / f'{next(names)}.db'}", tmp_path)
    priced = a_record()
    priced.spans[1].attributes[TOKEN_USAGE] = {"input_tokens": 1}  # usage beside a model: MLflow would price it
    foreign = a_record()
    foreign.spans[2].attributes["gen_ai.system"] = "openai"
    named = a_record()
    named.spans[0].outputs = {"model": "gpt-x"}  # MLflow would take it for the LM's name
    writer = plugin._row_writer()
    for record in (priced, foreign, named):
        assert writer.write_spans(plugin_experiment, parsed([a_record(), record])) is False
    resourced = parsed([a_record()])
    resourced[0]._span._resource = type(resourced[0]._span.resource)({"service.name": "elsewhere"})
    assert writer.write_spans(plugin_experiment, resourced) is False  # log_spans makes it a tag
    assert table_rows(plugin_uri)["trace_info"][1] == []  # nothing half-written
    # Through the store's log_spans all of them are written, by MLflow's own log_spans, as it writes them; a
    # trace already stored (the insert fails) is written again over itself.
    plain = a_record()
    batches = [[plain], [priced, foreign, named], [plain, a_record()]]
    for batch in batches:
        stock.log_spans(stock_experiment, parsed(batch))
        plugin.log_spans(plugin_experiment, parsed(batch))
    assert_same_rows(stock_uri, plugin_uri)
    # The speed-ups off: MLflow's own log_spans.
    monkeypatch.setenv("MLFLOW_DSPY_SPEEDUPS", "0")
    assert plugin._row_writer() is None


# -- the rows, PostgreSQL ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres():
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin)")
    with postgres_cluster() as server:
        yield server


@pytest.mark.e2e
def test_on_postgresql_both_fast_paths_write_the_very_rows_log_spans_writes(postgres, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_DSPY_SPEEDUPS", raising=False)
    (stock, stock_uri, stock_experiment), (plugin, plugin_uri, plugin_experiment) = two_stores(
        lambda: new_database(postgres), tmp_path)
    assert plugin.db_type == "postgresql"
    records = _varied_records() + qa_records(3)
    stock.log_spans(stock_experiment, parsed(records))
    assert plugin._row_writer().write_spans(plugin_experiment, parsed(records)), "declined on PostgreSQL"
    assert_same_rows(stock_uri, plugin_uri)
    # The gateway writer's own path into a PostgreSQL store: the rows MLflow's log_spans writes in process.
    direct = []
    for fast in (False, True):
        uri = new_database(postgres)
        client = TracingClient(uri)
        experiment = client.store.create_experiment("traces")
        if fast:
            assert records_writer(client.store, span_dicts)(experiment, copy.deepcopy(records))
        else:
            client.log_spans(experiment, [Span.from_dict(d) for record in records for d in span_dicts(record)])
        direct.append(uri)
    assert_same_rows(*direct)
