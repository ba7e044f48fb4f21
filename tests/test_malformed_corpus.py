"""Every malformed request in tests/malformed.py gets a 4xx naming the problem, from every route.

The same corpus goes to `mlflow models serve` /invocations; what it answers is
recorded in docs/reliability/mlflow-serve-malformed.json (the README compares).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import httpx
import pytest

from tests.malformed import GOOD, Case, corpus
from tests.support.processes import ROOT, mlflow_serve

ROUTES = ("/v1/chat/completions", "/invocations", "/predict")
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/root/|site-packages", re.IGNORECASE)
RECORD = ROOT / "docs" / "reliability" / "mlflow-serve-malformed.json"


def send(client: httpx.Client, url: str, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.content_type:
        headers["Content-Type"] = case.content_type
    return client.post(url, content=case.body, headers=headers)


@pytest.fixture(scope="module")
def servers(shared_gateway, registry, stub_env, tmp_path_factory):
    """Real servers, since headers and bodies reach them over TCP: the shared gateway (qa on the stub) and
    `mlflow models serve` of the shared registry's qa (its run's model, as `log` prints the URI)."""
    with mlflow_serve(registry.model_uri(1), tmp_path_factory.mktemp("corpus"), **registry.env(**stub_env)) as serve:
        yield shared_gateway.url, serve


def test_the_corpus_is_large_and_covers_every_kind_of_bad_input():
    names = [case.name for case in corpus()]
    assert len(names) >= 60
    for kind in ("invalid json", "invalid utf-8", "no messages", "empty messages", "no user turn", "unknown role",
                 "image part", "null", "max_tokens negative", "temperature absurd", "n absurd", "unknown top-level",
                 "10 MB body", "nesting 10,000", "100k-character", "header"):
        assert any(kind in name for name in names), kind


@pytest.mark.parametrize("route", ROUTES)
def test_every_malformed_request_gets_a_4xx_openai_error_naming_the_problem(servers, route):
    gw, _ = servers
    failures = []
    with httpx.Client(timeout=60) as client:
        for case in corpus():
            response = send(client, gw + route, case)
            problem = None
            if not 400 <= response.status_code < 500:
                problem = f"status {response.status_code}"
            elif LEAKS.search(response.text):
                problem = "leaks a trace or a path"
            else:
                try:
                    error = response.json()["error"]
                    if not (isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]
                            and error.get("type")):
                        problem = "no OpenAI error object"
                except (ValueError, KeyError, TypeError):
                    problem = "body is not an OpenAI error"
            if problem:
                failures.append(f"{case.name}: {problem}: {response.text[:200]}")
        # The server still answers a good request afterwards.
        good = client.post(gw + route, json={"text": GOOD["messages"][0]["content"]} if route == "/predict" else GOOD)
    assert not failures, "\n".join(failures)
    assert good.status_code == 200, good.text


def test_mlflow_serve_answers_are_recorded_and_ours_are_never_worse(servers):
    gw, serve = servers
    rows = []
    with httpx.Client(timeout=120) as client:
        for case in corpus():
            try:
                theirs = send(client, serve + "/invocations", case)
                status, leaks = theirs.status_code, bool(LEAKS.search(theirs.text))
            except httpx.TransportError as exc:  # recorded as what it is: no HTTP answer at all
                status, leaks = type(exc).__name__, False
            ours = send(client, gw + "/invocations", case)
            rows.append({"case": case.name, "mlflow_status": status, "mlflow_leaks_trace": leaks,
                         "gateway_status": ours.status_code})
        assert client.post(serve + "/invocations", json=GOOD).status_code == 200  # it survives too
    summary = {
        "cases": len(rows),
        "mlflow_statuses": dict(sorted(Counter(str(r["mlflow_status"]) for r in rows).items())),
        "mlflow_5xx": sum(isinstance(r["mlflow_status"], int) and r["mlflow_status"] >= 500 for r in rows),
        "mlflow_2xx": sum(isinstance(r["mlflow_status"], int) and r["mlflow_status"] < 300 for r in rows),
        "mlflow_no_http_answer": sum(isinstance(r["mlflow_status"], str) for r in rows),
        "mlflow_bodies_with_trace_or_path": sum(r["mlflow_leaks_trace"] for r in rows),
        "gateway_statuses": dict(sorted(Counter(str(r["gateway_status"]) for r in rows).items())),
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    assert all(400 <= r["gateway_status"] < 500 for r in rows)


def test_an_lm_failure_through_mlflow_serve_says_what_happened_without_a_traceback(servers):
    gw, serve = servers
    garbage = {"messages": [{"role": "user", "content": "[garbage] anything"}]}
    with httpx.Client(timeout=120) as client:
        theirs = client.post(serve + "/invocations", json=garbage)
        ours = client.post(gw + "/invocations", json=garbage)
    # Not a 400 that blames the client, and no stack trace or file path in the body.
    assert theirs.status_code == 500, theirs.text
    assert "could not be parsed into the program's outputs" in theirs.json()["message"]
    assert "stack_trace" not in theirs.json() and not LEAKS.search(theirs.text)
    assert ours.status_code == 502 and not LEAKS.search(ours.text)
