"""The registry is the router, with real processes: a real MLflow registry (a copy of the shared one: qa
versions 1-3, champion 1, challenger 2), `promote` moving an alias while clients keep asking, a version that
fails to load, and a 90/10 split (the stub LM answers). Two gateway processes: one following the champion,
one serving the split with traces on."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import cli_in_process
from tests.support.processes import gateway

ASK = {"model": "dspy-qa", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


def cli(*args: str, env: dict):
    return cli_in_process(*args, env=env)


@pytest.fixture(scope="module")
def router_registry(registry, stub, tmp_path_factory):
    """A copy of the shared registry: three versions of qa on the stub LM, version 1 the champion and version 2
    the challenger. Its aliases and tags change here."""
    store = registry.copy(tmp_path_factory.mktemp("router") / "store")
    return store.root, store.env(DSPY_LM="openai/stub-echo", OPENAI_API_KEY="sk-stub", DSPY_LM_API_BASE=stub)


@pytest.fixture(scope="module")
def champion_gateway(router_registry):
    """A gateway following models:/dspy-qa@champion, reloading every 0.5 s."""
    tmp, env = router_registry
    with gateway(["-m", "models:/dspy-qa@champion", "--reload-interval", "0.5"], tmp.parent, "--no-traces",
                 **env) as base:
        yield base


@pytest.fixture(scope="module")
def split_gateway(router_registry):
    """A gateway serving dspy-qa 90/10 between champion and challenger, with traces on."""
    tmp, env = router_registry
    with gateway(["--split", "dspy-qa=champion:90,challenger:10", "--reload-interval", "0"], tmp.parent,
                 **env) as base:
        yield base


def fingerprint(base: str, body: dict, **headers: str) -> str:
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-mlflow-dspy-model-version"] == reply.json()["system_fingerprint"]
    return reply.json()["system_fingerprint"]


def _serving(base: str, version: str) -> None:
    """Once the gateway answers with `version` (it follows the alias every 0.5 s)."""
    deadline = time.monotonic() + 60
    while fingerprint(base, ASK) != version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fingerprint(base, ASK) == version


def test_promote_moves_traffic_to_the_new_version_with_no_failed_request(router_registry, champion_gateway):
    _, env = router_registry
    base = champion_gateway
    _serving(base, "dspy-qa/1")
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                reply = http.post(f"{base}/v1/chat/completions", json=ASK)
                seen.append((reply.status_code, reply.json().get("system_fingerprint", "")))

    workers = [threading.Thread(target=client) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1)
    promoted = cli("promote", "--name", "dspy-qa", "--version", "2", env=env)
    assert promoted.code == 0, promoted.err[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(f == "dspy-qa/2" for _, f in seen[-20:]):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join()
    statuses = Counter(status for status, _ in seen)
    assert statuses == {200: len(seen)}, statuses  # not one request failed or was refused
    versions = [f for _, f in seen]
    switch = versions.index("dspy-qa/2")
    assert set(versions[:switch]) == {"dspy-qa/1"} and versions[-1] == "dspy-qa/2"
    ready = httpx.get(f"{base}/ready").json()
    assert "failures" not in ready
    assert cli("promote", "--name", "dspy-qa", "--version", "1", "--force", env=env).code == 0  # back


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(router_registry, champion_gateway):
    _, env = router_registry
    base = champion_gateway
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    _serving(base, "dspy-qa/1")
    broken = client.get_model_version("dspy-qa", "3")
    # Its recorded SHA-256 no longer matches its files: loading it is refused.
    client.set_model_version_tag("dspy-qa", "3", "model_sha256", "0" * 64)
    client.set_tag(broken.run_id, "model_sha256", "0" * 64)
    client.set_registered_model_alias("dspy-qa", "champion", "3")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "failures" not in httpx.get(f"{base}/ready").json():
        time.sleep(0.3)
    ready = httpx.get(f"{base}/ready").json()
    assert "version 3 failed to load" in ready["failures"]["dspy-qa@champion"]
    assert fingerprint(base, ASK) == "dspy-qa/1"  # the old version still answers
    text = httpx.get(f"{base}/metrics").text
    failed = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "mlflow_dspy_reload_failures_total")
    assert failed >= 1
    client.set_registered_model_alias("dspy-qa", "champion", "1")


def test_a_split_sends_about_one_request_in_ten_to_the_challenger_and_users_stick(split_gateway):
    base = split_gateway
    models = {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
    assert {"dspy-qa@champion", "dspy-qa@challenger"} <= models
    with httpx.Client(timeout=60) as http:
        picks = Counter(http.post(f"{base}/v1/chat/completions", json=ASK).json()["system_fingerprint"]
                        for _ in range(400))
    assert abs(picks["dspy-qa/2"] / 400 - 0.10) <= 0.05, picks
    sticky = {fingerprint(base, {**ASK, "user": "alice"}) for _ in range(20)}
    session = {fingerprint(base, ASK, **{"x-session-id": "s-7"}) for _ in range(20)}
    assert len(sticky) == 1 and len(session) == 1
    assert json.loads(httpx.get(f"{base}/ready").text)["models"]


def _traces(env: dict, filter_string: str, request_ids: set[str]) -> list:
    """The gateway's traces matching `filter_string`, once those of `request_ids` are among them (the store
    also holds the traces of the other tests on this gateway)."""
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("mlflow-dspy")
    for _ in range(150):
        found = mlflow.search_traces(locations=[experiment.experiment_id], filter_string=filter_string,
                                     return_type="list", max_results=5000)
        if request_ids <= {t.info.tags.get("mlflow_dspy.request_id") for t in found}:
            return found
        time.sleep(0.2)
    return found


def test_each_trace_is_tagged_with_the_model_version_variant_session_and_request(router_registry, split_gateway):
    _, env = router_registry
    base = split_gateway
    with httpx.Client(timeout=60) as http:
        answered = {}  # request id -> (fingerprint, session)
        index = 0
        # 30 users, and as many more as it takes for one to land on the challenger (10%).
        while index < 30 or "dspy-qa/2" not in {version for version, _ in answered.values()}:
            user, index = f"user-{index}", index + 1
            reply = http.post(f"{base}/v1/chat/completions", json={**ASK, "user": user})
            answered[reply.headers["x-request-id"]] = (reply.json()["system_fingerprint"], user)
            assert index < 300
        with http.stream("POST", f"{base}/v1/chat/completions", json={**ASK, "stream": True},
                         headers={"x-session-id": "s-stream"}) as streamed:
            streamed.read()
        answered[streamed.headers["x-request-id"]] = (streamed.headers["x-mlflow-dspy-model-version"], "s-stream")
        predicted = http.post(f"{base}/predict", json={"question": "What is 2 + 2?"})
        assert predicted.status_code == 200
    # Read while the gateway runs: it writes its traces in the background.
    traces = _traces(env, "tags.`mlflow_dspy.model` = 'dspy-qa'", set(answered))
    by_request = {t.info.tags["mlflow_dspy.request_id"]: t.info.tags for t in traces}
    assert set(answered) <= set(by_request)
    variant_of = {"dspy-qa/1": "champion", "dspy-qa/2": "challenger"}
    for request_id, (version, session) in answered.items():
        tags = by_request[request_id]
        assert tags["mlflow_dspy.version"] == version
        assert tags["mlflow_dspy.variant"] == variant_of[version]
        assert tags["mlflow_dspy.session"] == session
        assert tags["mlflow_dspy.route"] == "/v1/chat/completions"
    challengers = {r for r, (version, _) in answered.items() if version == "dspy-qa/2"}
    searched = _traces(env, "tags.`mlflow_dspy.variant` = 'challenger'", challengers)
    assert challengers <= {t.info.tags["mlflow_dspy.request_id"] for t in searched}
    predicted_id = {predicted.headers["x-request-id"]}  # /predict is traced and tagged too
    traced = _traces(env, "tags.`mlflow_dspy.route` = '/predict'", predicted_id)
    assert predicted_id <= {t.info.tags["mlflow_dspy.request_id"] for t in traced}
