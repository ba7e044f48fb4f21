"""Any other LM, through a real OpenAI-compatible server (the stub): the
multi-turn answer is for the last user turn, keys come from the serving
environment at call time, and no planted key reaches any artifact (the shared
registry's qa was logged with LOG_KEY in its environment)."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import httpx

from tests.conftest import LOG_KEY
from tests.support.cli import seeded_store
from tests.support.processes import mlflow_serve, stub_requests

ARG_KEY = "sk-planted-as-argument-5d2e81"
HEADER_KEY = "sk-planted-in-a-header-9a7c33"
PREDICTOR_KEY = "sk-planted-on-a-predictor-0e6b2f"
SERVE_KEY = "sk-serving-environment-1b4c6d"

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": "What is the first question?"},
        {"role": "assistant", "content": "It was the first."},
        {"role": "user", "content": "What is the capital of Peru, other LM?"},
    ]
}


def every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_no_key_in(root: Path, *keys: str) -> int:
    files = every_file(root)
    assert files
    for path in files:
        data = path.read_bytes()
        for key in keys:
            assert key.encode() not in data, f"{key} found in {path}"
    return len(files)


def test_multi_turn_is_answered_for_the_last_user_turn(stub, registry, tmp_path):
    serve_env = registry.env(OPENAI_API_KEY=SERVE_KEY, DSPY_LM_API_BASE=stub)  # the server: the environment's
    with mlflow_serve(registry.model_uri(1), tmp_path, **serve_env) as base:
        response = httpx.post(f"{base}/invocations", json=CONVERSATION, timeout=60)
    assert response.status_code == 200, response.text
    content = json.loads(response.json()["choices"][0]["message"]["content"])
    # the last user turn is the question; qa's history got the earlier one (the stub counts it)
    assert content["answer"] == "answer: What is the capital of Peru, other LM? (after 1 earlier turns)"

    served = [r for r in stub_requests(stub) if "What is the capital of Peru, other LM?" in json.dumps(r["body"])]
    # The key came from the serving process's environment, at call time.
    assert served and served[-1]["authorization"] == f"Bearer {SERVE_KEY}"
    system_prompt = served[-1]["body"]["messages"][0]["content"]
    assert "You answer questions." in system_prompt

    files = assert_no_key_in(registry.root / "mlartifacts", LOG_KEY, SERVE_KEY)
    assert files >= 8
    assert LOG_KEY.encode() not in (registry.root / "mlflow.db").read_bytes()


def test_key_passed_to_dspy_lm_is_stripped_before_logging(stub, tmp_path, monkeypatch):
    from mlflow_dspy.packaging.log import log_target
    from mlflow_dspy.program.target import open_target

    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded_store(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", LOG_KEY)  # the log-time example run reads the environment
    lm = dspy.LM("openai/stub-echo", api_key=ARG_KEY, api_base=stub, cache=False,
                 extra_headers={"X-Api-Key": HEADER_KEY})
    program = dspy.ChainOfThought("question -> answer")
    program.predict.lm = dspy.LM("openai/stub-echo", api_key=PREDICTOR_KEY, api_base=stub, cache=False)
    with dspy.context(lm=lm, adapter=None):
        logged = log_target(open_target("qa"), lm=lm, registered_model_name="dspy-qa-secrets", module=program)
    assert logged.version == "1"
    assert lm.kwargs["api_key"] == ARG_KEY  # the caller's LM is untouched
    keys = (ARG_KEY, LOG_KEY, HEADER_KEY, PREDICTOR_KEY)
    assert_no_key_in(tmp_path / "mlartifacts", *keys)  # the model, its run copy, program_state.json, eval table
    database = (tmp_path / "mlflow.db").read_bytes()
    assert not any(key.encode() in database for key in keys)
