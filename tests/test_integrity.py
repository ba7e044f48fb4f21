"""The SHA-256 of a model's files is recorded at log time; serve, gateway and batch refuse a tampered one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_dspy.packaging.integrity import ALLOW_UNVERIFIED_ENV, DIGEST_TAG, IntegrityError, digest, verify
from tests.conftest import run_log_cli, store_env
from tests.support.processes import ROOT, free_port, running, stub_lm


def test_digest_covers_every_byte_and_every_name(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.pkl").write_bytes(b"\x80\x04pickle")
    (tmp_path / "MLmodel").write_text("flavors: {}")
    before = digest(tmp_path)
    assert digest(tmp_path) == before  # stable
    (tmp_path / "data" / "model.pkl").write_bytes(b"\x80\x05pickle")
    assert digest(tmp_path) != before
    (tmp_path / "data" / "model.pkl").write_bytes(b"\x80\x04pickle")
    (tmp_path / "MLmodel").rename(tmp_path / "MLmodel2")
    assert digest(tmp_path) != before


def test_a_model_without_a_recorded_digest_is_refused_unless_allowed(tmp_path, monkeypatch):
    (tmp_path / "MLmodel").write_text("flavors: {}")
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(IntegrityError, match="no recorded model_sha256"):
        verify(str(tmp_path), tmp_path)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert verify(str(tmp_path), tmp_path) == digest(tmp_path)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """qa logged against the stub LM: (environment, log result, store directory)."""
    store = tmp_path_factory.mktemp("integrity_store")
    with stub_lm(store) as base:
        env = store_env(store, DSPY_LM="openai/stub", DSPY_LM_API_BASE=base, OPENAI_API_KEY="sk-test")
        result = run_log_cli("--program", "qa", "--no-eval", env=env)
        yield env, result, store


def test_log_records_the_digest_on_the_run_and_the_version(logged):
    env, result, _ = logged
    store = env["MLFLOW_TRACKING_URI"]  # explicit: another test may have set mlflow's global URI
    client = MlflowClient(tracking_uri=store)
    run_tag = client.get_run(result["run_id"]).data.tags[DIGEST_TAG]
    version_tag = client.get_model_version(result["registered_model"], result["version"]).tags[DIGEST_TAG]
    local = mlflow.artifacts.download_artifacts(result["model_uri"], tracking_uri=store)
    assert run_tag == version_tag == digest(local)


def _flip_one_byte(store: Path) -> list[Path]:
    """Change one byte of every copy of the model's pickle in the artifact store."""
    pickles = [p for p in store.rglob("model.pkl") if "mlartifacts" in p.parts]
    for path in pickles:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    return pickles


def test_serve_gateway_and_batch_refuse_a_model_with_one_byte_changed(logged, tmp_path):
    env, result, store = logged
    uri = result["model_uri"]
    version_uri = f"models:/{result['registered_model']}/{result['version']}"
    assert _flip_one_byte(store), "no pickle found in the artifact store"

    serve = subprocess.run([sys.executable, "mlflow_dspy.py", "serve", "-m", version_uri, "-p", str(free_port())],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert serve.returncode == 3
    assert "do not match the SHA-256" in serve.stderr and "Traceback" not in serve.stderr

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"question": "hi"}) + "\n")
    batch = subprocess.run([sys.executable, "mlflow_dspy.py", "batch", "-m", uri, "--input", str(rows),
                            "--output", str(tmp_path / "out.jsonl")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert batch.returncode == 3
    assert "do not match the SHA-256" in batch.stderr and "Traceback" not in batch.stderr
    assert not (tmp_path / "out.jsonl").exists()

    port = free_port()
    args = [sys.executable, "mlflow_dspy.py", "gateway", "-m", uri, "--port", str(port), "--no-traces"]
    base = f"http://127.0.0.1:{port}"
    with running(args, f"{base}/health", env, tmp_path / "gateway.log"):
        deadline = time.monotonic() + 120
        while (ready := httpx.get(f"{base}/ready")).status_code == 503 and "loading" in ready.text:
            assert time.monotonic() < deadline, "the gateway never finished loading"
            time.sleep(0.5)
        assert ready.status_code == 503
        assert "do not match the SHA-256" in ready.json()["error"]["message"]
        answer = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 503  # nothing was unpickled, nothing answers
    assert "refusing to unpickle" in (tmp_path / "gateway.log").read_text()
