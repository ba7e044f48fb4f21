"""Credentials are stripped from the LM copies MLflow pickles; the originals keep working."""

import cloudpickle
import dspy
import pytest

from mlflow_dspy.packaging.redact import clean_url, is_secret_name, scrub_lm, scrub_program, scrub_settings

KEY = "sk-planted-0123456789abcdef"


@pytest.mark.parametrize("name", ["api_key", "aws_secret_access_key", "vertex_credentials", "X-Api-Key",
                                  "Authorization", "Cookie", "access_token", "apiKey", "password"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "temperature", "api_base", "model",
                                  "keywords", "tokenizer"])
def test_ordinary_names_are_kept(name):
    assert not is_secret_name(name)


def test_scrubbed_lm_has_no_key_and_keeps_its_settings():
    lm = dspy.LM("openai/gpt-4o-mini", api_key=KEY, api_base=f"http://user:{KEY}@127.0.0.1:9/v1?api-key={KEY}&x=1",
                 max_tokens=321, extra_headers={"Authorization": f"Bearer {KEY}", "X-Team": "a"},
                 extra_body={"nested": {"client_secret": KEY, "keep": 1}})
    clean = scrub_lm(lm)
    assert KEY.encode() not in cloudpickle.dumps(clean)
    assert clean.kwargs["api_base"] == "http://127.0.0.1:9/v1?x=1"
    assert clean.kwargs["max_tokens"] == 321
    assert clean.kwargs["extra_headers"] == {"X-Team": "a"}
    assert clean.kwargs["extra_body"] == {"nested": {"keep": 1}}
    assert lm.kwargs["api_key"] == KEY  # the caller's LM is untouched


def test_scrubbed_lm_forgets_call_history():
    lm = dspy.LM("openai/gpt-4o-mini")
    lm.history.append({"prompt": "secret conversation"})
    assert scrub_lm(lm).history == []
    assert lm.history


class Pipeline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.judge_lm = dspy.LM("openai/judge", api_key=KEY)  # an LM kept as a plain attribute
        self.step = dspy.ChainOfThought("question -> answer")


def test_every_lm_in_the_program_is_scrubbed():
    program = Pipeline()
    program.step.predict.lm = dspy.LM("openai/gpt-4o-mini", api_key=KEY)
    clean = scrub_program(program)
    assert KEY.encode() not in cloudpickle.dumps(clean)
    assert program.step.predict.lm.kwargs["api_key"] == KEY
    assert program.judge_lm.kwargs["api_key"] == KEY


def test_settings_overrides_drop_callbacks_and_adapter_lms():
    adapter = dspy.TwoStepAdapter(extraction_model=dspy.LM("openai/extract", api_key=KEY))
    class Observer(dspy.utils.callback.BaseCallback):
        token = KEY  # an observability client holding its own key

    with dspy.context(callbacks=[Observer()]), \
            dspy.context(**scrub_settings(dspy.LM("openai/x", api_key=KEY), adapter)):
        blob = cloudpickle.dumps(dict(dspy.settings.config))
    assert KEY.encode() not in blob
    assert adapter.extraction_model.kwargs["api_key"] == KEY


def test_url_without_secrets_is_unchanged():
    assert clean_url("https://api.example.com/v1") == "https://api.example.com/v1"
