"""Property-based fuzzing of the gateway's OpenAPI schema (schemathesis), bounded in count and time.

Every generated request, valid or not, must get a documented status that is
not a 5xx, and every error must be an OpenAI error object without a trace.
"""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, status_code_conformance

from tests.support.processes import gateway, stub_lm

LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with stub_lm(tmp) as stub, gateway(["--program", "qa", "--lm", "openai/stub"], tmp, "--no-traces",
                                       "--request-timeout", "20", DSPY_LM_API_BASE=stub,
                                       OPENAI_API_KEY="sk-test") as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def errors_are_openai_objects_without_traces(ctx, response, case) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), dict) and body["error"].get("message"), response.text
        assert not LEAKS.search(response.text), response.text


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_documented_non_5xx_answers(case):
    response = case.call(timeout=30)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
    errors_are_openai_objects_without_traces(None, response, case)
