"""Every row of every table of a tracking store's database, to compare two ways of writing the same traces."""

from __future__ import annotations

import sqlalchemy


def table_rows(uri: str) -> dict[str, tuple[list[str], list[str]]]:
    """Every table's columns and rows (sorted), but the experiments' (created apart, at other times)."""
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            found = {}
            for table in sqlalchemy.inspect(connection).get_table_names():
                if table != "experiments":
                    result = connection.execute(sqlalchemy.text(f'SELECT * FROM "{table}"'))
                    found[table] = (list(result.keys()), sorted(map(repr, result)))
            return found
    finally:
        engine.dispose()


def assert_same_rows(expected_uri: str, written_uri: str) -> None:
    """The two databases hold the same rows in every table, naming the first table that differs."""
    expected, written = table_rows(expected_uri), table_rows(written_uri)
    assert set(written) == set(expected)
    for table, (columns, rows) in expected.items():
        assert written[table][0] == columns, f"MLflow's table {table} changed its columns: see mlflow_sql_traces"
        assert written[table][1] == rows, f"log_spans writes other rows into {table} now: see mlflow_sql_traces"
