"""Property-based fuzzing of the gateway's OpenAPI schema (schemathesis), bounded in count.

Every generated request, valid or not, must get a documented status that is
not a 5xx, and every error must be an OpenAI error object without a trace.
The gateway app runs in process (schemathesis `from_asgi`), its LM the stub LM
through the gateway's own HTTP engine: the subject is what it answers, not the
process (HTTP/1.1 and the header limits are tested against a real uvicorn in
test_internals_uvicorn_protocol.py and test_malformed_corpus.py).
"""

from __future__ import annotations

import itertools
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance

from tests.support.inprocess import gateway_app

# A source path (/…/x.py) is a leak; a client's own text echoed back (model '.py') is not.
LEAKS = re.compile(r"Traceback|File \"|/[\w.-]+\.py\b|site-packages")
EXAMPLES = 40  # per operation: bounded in count


@pytest.fixture(scope="module")
def api_schema(stub):
    app = gateway_app(stub, program="qa", request_timeout=20)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def errors_are_openai_objects_without_traces(response) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), dict) and body["error"].get("message"), response.text
        assert not LEAKS.search(response.text), response.text


def test_fuzzed_requests_get_documented_non_5xx_answers(api_schema):
    # Driven through hypothesis directly, one operation and generation mode at a time.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
            errors_are_openai_objects_without_traces(response)

        call()
