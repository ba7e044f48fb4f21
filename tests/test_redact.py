"""Credentials are stripped from the LM copies MLflow pickles; the originals keep working."""

import cloudpickle
import dspy

from packager.redact import scrub_lm, scrub_program

KEY = "sk-planted-0123456789abcdef"


def test_scrubbed_lm_has_no_key_and_original_keeps_it():
    lm = dspy.LM("openai/gpt-4o-mini", api_key=KEY, api_base="http://127.0.0.1:9/v1",
                 extra_headers={"Authorization": f"Bearer {KEY}", "X-Team": "a"})
    clean = scrub_lm(lm)
    blob = cloudpickle.dumps(clean)
    assert KEY.encode() not in blob
    assert clean.kwargs["api_base"] == "http://127.0.0.1:9/v1"
    assert clean.kwargs["extra_headers"] == {"X-Team": "a"}
    assert lm.kwargs["api_key"] == KEY


def test_scrubbed_lm_forgets_call_history():
    lm = dspy.LM("openai/gpt-4o-mini")
    lm.history.append({"prompt": "secret conversation"})
    assert scrub_lm(lm).history == []
    assert lm.history


def test_predictor_level_lms_are_scrubbed_too():
    program = dspy.ChainOfThought("question -> answer")
    program.predict.lm = dspy.LM("openai/gpt-4o-mini", api_key=KEY)
    clean = scrub_program(program)
    assert KEY.encode() not in cloudpickle.dumps(clean)
    assert program.predict.lm.kwargs["api_key"] == KEY
