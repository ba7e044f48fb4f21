"""Batch inference: N rows in, N rows out, in order, on pandas and on Spark;
failed rows recorded, the rest answered; an interrupted run resumes without
recomputing anything done. The `batch` command in a subprocess (Spark, a SIGKILL)
against the shared registry's qa, whose LM is the stub server (deterministic),
and once with the embedded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.support.cli import store_env
from tests.support.processes import ROOT, stub_requests

ROWS = 200
FAILING = {17, 101, 163}  # rows whose LM call fails: the stub answers HTTP 500


def question(i: int) -> str:
    return f"[fail500] row {i}?" if i in FAILING else f"What is row {i}?"


@pytest.fixture(scope="module")
def stub_model(registry, stub):
    """The shared registry's qa, version 1 (read only), and the environment to run it in (the stub's URL in it: a
    model never names the server its key goes to)."""
    return registry.model_uri(1), registry.env(OPENAI_API_KEY="sk-batch-test", DSPY_LM_API_BASE=stub)


def batch(model_uri: str, source, target, env: dict, *options: str) -> subprocess.Popen:
    args = [sys.executable, "mlflow_dspy.py", "batch", "-m", model_uri, "--input", str(source),
            "--output", str(target), "--json", *options]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finished(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "questions.jsonl"
    pd.DataFrame({"id": range(ROWS), "question": [question(i) for i in range(ROWS)]}).to_json(
        path, orient="records", lines=True)
    return path


def assert_every_row(output: pd.DataFrame) -> None:
    assert len(output) == ROWS
    assert list(output["id"]) == list(range(ROWS))  # in order
    for i, row in output.iterrows():
        if i in FAILING:
            assert row["answer"] is None or pd.isna(row["answer"])
            assert "Error" in row["error"], row["error"]
        else:
            assert row["answer"] == f"answer: {question(i)}", (i, row["answer"])
            assert json.loads(row["prediction"])["answer"] == row["answer"]
            assert row["error"] is None or pd.isna(row["error"])


@pytest.mark.parametrize(("engine", "suffix"), [("pandas", ".parquet"), ("spark", ".csv")])
def test_every_row_in_order_with_failures_recorded(stub_model, questions, tmp_path, engine, suffix):
    model_uri, env = stub_model
    target = tmp_path / f"answers{suffix}"
    report = finished(batch(model_uri, questions, target, env, "--engine", engine, "--concurrency", "16"))
    assert report == {"rows": ROWS, "computed": ROWS, "skipped": 0, "failed": len(FAILING), "output": str(target)}
    output = pd.read_parquet(target) if suffix == ".parquet" else pd.read_csv(target)
    if suffix == ".csv":
        output = output.astype(object).where(output.notna(), None)
    assert_every_row(output)
    assert not (tmp_path / f"answers{suffix}.progress.jsonl").exists()


def test_chat_rows_are_answered_for_their_last_user_turn(stub_model, tmp_path):
    model_uri, env = stub_model
    source = tmp_path / "chats.parquet"
    chats = [[{"role": "user", "content": "first?"}, {"role": "assistant", "content": "x"},
              {"role": "user", "content": f"Chat {i}?"}] for i in range(5)]
    pd.DataFrame({"messages": chats}).to_parquet(source)
    finished(batch(model_uri, source, tmp_path / "out.jsonl", env))
    output = pd.read_json(tmp_path / "out.jsonl", lines=True)
    # qa's dspy.History gets the earlier turn (the stub counts earlier user messages in its prompt)
    assert list(output["answer"]) == [f"answer: Chat {i}? (after 1 earlier turns)" for i in range(5)]


def test_an_interrupted_run_resumes_without_recomputing(stub, stub_model, questions, tmp_path):
    model_uri, env = stub_model
    target = tmp_path / "answers.jsonl"
    progress = tmp_path / "answers.jsonl.progress.jsonl"
    first = batch(model_uri, questions, target, env, "--concurrency", "2")
    for _ in range(3000):  # the stub answers at once, but each [fail500] row waits out DSPy's retries
        if progress.exists() and len(progress.read_text().splitlines()) >= 40:
            break
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # no clean shutdown: as a crash or a lost machine
    first.wait()
    done_before = {json.loads(line)["row_id"] for line in progress.read_text().splitlines() if line.endswith("}")}
    succeeded_before = done_before - FAILING
    assert 40 <= len(done_before) < ROWS
    resumed = time.time()
    report = finished(batch(model_uri, questions, target, env, "--concurrency", "8"))
    assert report["skipped"] == len(succeeded_before)
    assert report["computed"] == ROWS - len(succeeded_before)
    asked = [json.dumps(r["body"]) for r in stub_requests(stub, since=resumed)]
    for row_id in succeeded_before:  # nothing that was done is asked again
        assert not any(f"What is row {row_id}?" in body for body in asked), row_id
    assert_every_row(pd.read_json(target, lines=True).astype(object).where(lambda f: f.notna(), None))


def test_embedded_model_answers_a_small_batch(embedded_qa, embedded_store, tmp_path):
    source = tmp_path / "questions.csv"
    pd.DataFrame({"question": ["What is 2 + 2?", "What is the capital of France?", "Name a color."]}).to_csv(
        source, index=False)
    report = finished(batch(embedded_qa["model_uri"], source, tmp_path / "out.parquet", store_env(embedded_store),
                            "--concurrency", "3"))
    assert report["rows"] == 3 and report["failed"] == 0
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert all(isinstance(a, str) and a.strip() for a in output["answer"])
