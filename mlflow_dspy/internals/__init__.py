"""The one place for code that relies on private internals of DSPy, MLflow, httpx and uvicorn.

Each module here leans on something its library does not promise to keep, and
each has a test that fails loudly, naming what changed, when it does:

* `dspy_executor`: the event loop's default executor runs two of DSPy's
  bookkeeping steps (`dspy.clients.execution.prepare`, `_price_result`) inline
  instead of on a worker thread (tests/test_internals_dspy_executor.py);
* `dspy_callbacks`: DSPy's choice of callback handler per event (module, adapter,
  LM) remembered per class instead of made again by isinstance checks
  (tests/test_internals_dspy_callbacks.py pins DSPy's two functions);
* `dspy_chat_adapter`: a ChatAdapter subclass that writes DSPy's very prompts
  with less CPU, overriding its formatting methods
  (tests/test_internals_dspy_chat_adapter.py compares every prompt);
* `uvicorn_protocol`: uvicorn's httptools protocol with limits on the header
  section, and a transport that sends one turn's writes as one
  (tests/test_internals_uvicorn_protocol.py pins uvicorn's `data_received`);
* `dspy_stream`: what a raw LM chunk from `dspy.streamify` holds (its text, the
  predictor and the LM call it belongs to) (tests/test_internals_dspy_stream.py);
* `mlflow_traces`: recorded traces written the way MLflow's own exporter writes
  them (`TracingClient.log_spans`, `Span.from_dict`'s format, the attribute keys
  MLflow reads a trace from; an HTTP store's cached `/version` lookup, cleared after a failure)
  (tests/test_internals_mlflow_traces.py);
* `mlflow_sql_traces`: a batch of new traces written into a SQLite or PostgreSQL store's tables as the very rows
  MLflow's `log_spans` writes, in one transaction: the gateway writer's own records, or the spans MLflow's OTLP
  route parses (tests/test_internals_mlflow_traces.py and tests/test_internals_mlflow_store_plugin.py compare every
  row of every table, on SQLite and PostgreSQL);
* `mlflow_store_plugin`: a tracking-store plugin for `mlflow server` (`mlflow-dspy+sqlite:///`,
  `mlflow-dspy+postgresql+psycopg2://`; entry points in pyproject.toml): MLflow's `SqlAlchemyStore` whose
  `log_spans` writes those rows (tests/test_internals_mlflow_store_plugin.py);
* `mlflow_assessments`: an assessment written to an HTTP tracking store in one request within a deadline
  (`http_request` without MLflow's retries, to the endpoint `RestStore.create_assessment` posts to)
  (tests/test_internals_mlflow_assessments.py);
* `httpx_proxy`: whether httpx would send a request through a proxy (the gateway's
  LM calls take httpx only then) (tests/test_internals_httpx_proxy.py).

The speed-ups (the executor, the callback handlers, the adapter, the coalescing transport and the SQL
trace rows, the store plugin's included) are on
by default and all turned off by `MLFLOW_DSPY_SPEEDUPS=0` (the gateway's
`--no-speedups` sets it for its workers): the server then runs DSPy's and
uvicorn's own code paths (and FastAPI's routing for the program routes,
gateway/app.py), slower, with the same answers. The header limits, the stream
chunks, the trace writing and the proxy question are not speed-ups, and stay on
either way.

This room imports nothing of mlflow_dspy: the runtime and the gateway above it
choose what to use through `speedups_enabled()`.
"""

from __future__ import annotations

import os

SPEEDUPS_ENV = "MLFLOW_DSPY_SPEEDUPS"


def speedups_enabled() -> bool:
    """Whether the speed-ups built on private internals are on (the default); read at each use."""
    return os.environ.get(SPEEDUPS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")
