"""The SHA-256 of a model's files is recorded at log time (its manifest, and the `model_sha256` tag); serve, gateway
and batch refuse a tampered one. Signatures and private copies: test_manifest.py, test_signed_models_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_dspy.packaging.integrity import ALLOW_UNVERIFIED_ENV, DIGEST_TAG, IntegrityError, digest, verify
from tests.support.cli import cli_in_process, environment
from tests.support.inprocess import asgi_client, gateway_app, until_ready


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


def test_a_model_without_a_manifest_or_a_recorded_digest_is_refused_unless_allowed(tmp_path, monkeypatch):
    (tmp_path / "MLmodel").write_text("flavors: {}")
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(IntegrityError, match="no recorded model_sha256"):
        verify(str(tmp_path), tmp_path, ())
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert verify(str(tmp_path), tmp_path, ()).digest == digest(tmp_path)


@pytest.fixture(scope="module")
def logged(registry, stub, tmp_path_factory):
    """A copy of the shared registry (its qa versions logged through the CLI on the stub): (environment, version 1's
    log result, store directory). Its files get tampered with. (The stub's URL comes from the environment: a model
    never names the server its key goes to.)"""
    store = registry.copy(tmp_path_factory.mktemp("integrity") / "store")
    return store.env(OPENAI_API_KEY="sk-test", DSPY_LM_API_BASE=stub), store.logged[0], store.root


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


def test_serve_gateway_and_batch_refuse_a_model_with_one_byte_changed(logged, tmp_path, monkeypatch):
    """In process: each refuses before anything is unpickled (a serve that got past the check would start
    mlflow's server: that is stopped here)."""
    env, result, store = logged
    uri = result["model_uri"]
    version_uri = f"models:/{result['registered_model']}/{result['version']}"
    assert _flip_one_byte(store), "no pickle found in the artifact store"

    def not_verified(*args):
        raise AssertionError(f"serve got past the check: {args}")

    monkeypatch.setattr("mlflow_dspy.packaging.serve.run_forwarding_signals", not_verified)
    serve = cli_in_process("serve", "-m", version_uri, "-p", "9", env=env)
    assert serve.code == 3
    assert "do not match the SHA-256" in serve.err and "Traceback" not in serve.err

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"question": "hi"}) + "\n")
    batch = cli_in_process("batch", "-m", uri, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), env=env)
    assert batch.code == 3
    assert "do not match the SHA-256" in batch.err and "Traceback" not in batch.err
    assert not (tmp_path / "out.jsonl").exists()

    async def gateway() -> tuple[httpx.Response, httpx.Response]:
        async with asgi_client(gateway_app(model_uris=(uri,)), lifespan=True) as client:
            ready = await until_ready(client)  # no longer loading
            return ready, await client.post("/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": "hi"}]})

    with environment(env), caplog_of("mlflow_dspy") as lines:
        ready, answer = asyncio.run(gateway())
    assert ready.status_code == 503
    assert "do not match the SHA-256" in ready.json()["error"]["message"]
    assert answer.status_code == 503  # nothing was unpickled, nothing answers
    assert any("refusing to load it" in line for line in lines)


@contextlib.contextmanager
def caplog_of(name: str):
    """The records of logger `name` (and below) while in the block, as text."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger, handler = logging.getLogger(name), Keep(logging.DEBUG)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
