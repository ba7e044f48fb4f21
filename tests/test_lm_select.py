"""One setting picks the LM: --lm, else DSPY_LM, else the embedded model."""

import pytest

from mlflow_dspy.lm_engine import EMBEDDED_MODEL, LlamaCppEngine, build_lm, lm_model_string
from mlflow_dspy.lm_engine.openai_http import OpenAIHTTPEngine


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("DSPY_LM", raising=False)
    monkeypatch.delenv("DSPY_LM_API_BASE", raising=False)


def test_embedded_model_is_the_default():
    assert lm_model_string() == EMBEDDED_MODEL
    assert isinstance(build_lm().engine, LlamaCppEngine)


def test_environment_variable_picks_a_provider(monkeypatch):
    monkeypatch.setenv("DSPY_LM", "openai/gpt-4o-mini")
    lm = build_lm()
    assert lm.model == "openai/gpt-4o-mini"
    assert isinstance(lm.engine, OpenAIHTTPEngine)
    assert lm.engine.url == "https://api.openai.com/v1/chat/completions"
    assert lm.engine.supports_response_schema  # real OpenAI honours JSON schemas


def test_other_providers_keep_dspys_own_route(monkeypatch):
    monkeypatch.setenv("DSPY_LM", "anthropic/claude-3-5-haiku")
    lm = build_lm()
    assert lm.model == "anthropic/claude-3-5-haiku"
    assert lm.engine == "auto"


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("DSPY_LM", "openai/gpt-4o-mini")
    assert lm_model_string("anthropic/claude-3-5-haiku") == "anthropic/claude-3-5-haiku"
    assert lm_model_string("embedded") == EMBEDDED_MODEL


def test_api_base_comes_from_the_environment_and_no_key_is_held(monkeypatch):
    monkeypatch.setenv("DSPY_LM", "openai/my-model")
    monkeypatch.setenv("DSPY_LM_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-held-in-env-only")
    lm = build_lm()
    assert lm.engine.url == "http://127.0.0.1:9/v1/chat/completions"
    assert not lm.engine.supports_response_schema  # an arbitrary compatible server may not
    assert "sk-held-in-env-only" not in repr(vars(lm)) + repr(vars(lm.engine))
