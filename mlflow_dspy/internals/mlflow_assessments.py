"""An assessment written to an HTTP tracking store within a deadline, through parts MLflow does not promise
to keep.

`mlflow.log_feedback` sends its one request through MLflow's HTTP client, which retries a store that does
not answer (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, 7 by default, with a backoff that doubles from 2 s) and waits
up to `MLFLOW_HTTP_REQUEST_TIMEOUT` (120 s) for each attempt: feedback posted while the store was down
hung 115 s. Those settings are read from the process's environment, where the gateway's other calls to the
store (loading a model, following an alias) want MLflow's patient defaults. So `bounded_writer` sends
the very request `RestStore.create_assessment` sends, once, with its own timeout. It leans on:

* `mlflow.utils.rest_utils.http_request` (its `max_retries` and `timeout` arguments), and
  `verify_rest_response`, which turns an error answer into MLflow's exception;
* the endpoint `RestStore.create_assessment` posts to (`_V3_TRACE_REST_API_PATH_PREFIX`/<trace id>/assessments)
  and its body, `CreateAssessment(assessment=...)` as JSON (`message_to_json`), the answer read with
  `parse_dict` into `CreateAssessment.Response`.

Any other store (SQLite, a database) takes `mlflow.log_assessment`, MLflow's public API, which does not
retry. tests/test_internals_mlflow_assessments.py writes through this into a real `mlflow server`, reads
the assessment back with MLflow's public API, and times a write to a stopped one; it fails, naming what
changed, when these change. Not a speed-up: it stays on with `MLFLOW_DSPY_SPEEDUPS=0`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def bounded_writer(tracking_uri: str, timeout: float) -> Callable[[Any], Any] | None:
    """For an HTTP tracking store, a function that writes an `mlflow.entities.Assessment` in one request of at
    most `timeout` seconds to connect and as many to answer, and returns the stored one (raising MLflow's
    exception when the store fails or refuses); None for any other store."""
    from mlflow.entities import Assessment
    from mlflow.protos.service_pb2 import CreateAssessment
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracing.client import TracingClient
    from mlflow.utils.proto_json_utils import message_to_json, parse_dict
    from mlflow.utils.rest_utils import _V3_TRACE_REST_API_PATH_PREFIX, http_request, verify_rest_response

    store = TracingClient(tracking_uri).store
    if not isinstance(store, RestStore):
        return None

    def write(assessment: Assessment) -> Assessment:
        endpoint = f"{_V3_TRACE_REST_API_PATH_PREFIX}/{assessment.trace_id}/assessments"
        body = json.loads(message_to_json(CreateAssessment(assessment=assessment.to_proto())))
        response = http_request(store.get_host_creds(), endpoint, "POST", max_retries=0, backoff_factor=0,
                                timeout=timeout, json=body)
        response = verify_rest_response(response, endpoint)
        answer = CreateAssessment.Response()
        parse_dict(js_dict=json.loads(response.text), message=answer)
        return Assessment.from_proto(answer.assessment)

    return write
