"""Property-based fuzzing of the gateway's OpenAPI schema (schemathesis), bounded in count and time.

Every generated request, valid or not, must get a documented status that is
not a 5xx, and every error must be an OpenAI error object without a trace.
"""

from __future__ import annotations

import itertools
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance

from tests.support.processes import gateway, stub_lm

# A source path (/…/x.py) is a leak; a client's own text echoed back (model '.py') is not.
LEAKS = re.compile(r"Traceback|File \"|/[\w.-]+\.py\b|site-packages")
EXAMPLES = 40  # per operation: bounded in count (and, through the stub, in time)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with stub_lm(tmp) as stub, gateway(["--program", "qa", "--lm", "openai/stub"], tmp, "--no-traces",
                                       "--request-timeout", "20", DSPY_LM_API_BASE=stub,
                                       OPENAI_API_KEY="sk-test") as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


def errors_are_openai_objects_without_traces(response) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), dict) and body["error"].get("message"), response.text
        assert not LEAKS.search(response.text), response.text


def test_fuzzed_requests_get_documented_non_5xx_answers(api_schema):
    # Driven through hypothesis directly: the schema exists only once the gateway runs.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            response = case.call(timeout=30)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
            errors_are_openai_objects_without_traces(response)

        call()
