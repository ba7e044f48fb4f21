"""Each gateway setting is declared once (mlflow_dspy/gateway/config.py) and the command line, the
environment and the configuration the workers rebuild all agree on it: a flag wins over its variable,
which wins over the default."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import httpx
import pytest

from mlflow_dspy import cli
from mlflow_dspy.gateway.config import API_KEYS_ENV, BY_NAME, DEFAULTS, SETTINGS, GatewayConfig, Setting, env_name
from mlflow_dspy.internals.header_limits import HeaderLimits
from mlflow_dspy.lm_engine.embedded_settings import EmbeddedSettings

WITH_FLAGS = [s for s in SETTINGS if s.flags]


def gateway_parser() -> argparse.ArgumentParser:
    [commands] = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["gateway"]


def from_command_line(argv: list[str], environ: dict[str, str] | None = None) -> GatewayConfig:
    """What `mlflow-dspy gateway ARGV` resolves to, as cmd_gateway does, in `environ` (default: empty)."""
    args = cli.build_parser().parse_args(["gateway", *argv])
    return GatewayConfig.resolve(vars(args), environ or {})


def other_value(setting: Setting) -> Any:
    """A valid value of `setting` that is not its default."""
    base = setting.default
    if setting.kind == "list":
        return ("champion=a:90,b:10", "faq=a:50,b:50") if setting.name == "splits" else ("one", "two")
    if setting.kind == "switch":
        return not base
    if setting.kind == "str":
        return f"some-{setting.name}"
    if setting.most is not None:
        return (setting.least + setting.most) / 2 if setting.kind == "float" else int(setting.most) - 1
    step = 1.5 if setting.kind == "float" else 1
    return (base if base is not None else 2) + step


def flags_for(setting: Setting, value: Any) -> list[str]:
    if setting.kind == "list":
        return [arg for item in value for arg in (setting.flag, item)]
    if setting.kind == "switch":
        return [setting.flag] if value != setting.default else []
    return [setting.flag, setting.text(value)]


def test_every_setting_has_a_flag_a_variable_a_default_and_help():
    names = {f.name for f in dataclasses.fields(GatewayConfig)}
    assert set(BY_NAME) == names - {"load_before_serving"}  # the one field that follows from another (workers)
    for setting in SETTINGS:
        assert setting.help and setting.env and setting.kind, setting
        assert setting.default == getattr(DEFAULTS, setting.name)
        if setting.default is None and setting.kind != "str":
            assert setting.shown_default, f"{setting.name}: --help must say what None means"
    # Only the API keys have no flag: they never go on a command line.
    assert [s.name for s in SETTINGS if not s.flags] == ["api_keys"]
    assert BY_NAME["api_keys"].env == API_KEYS_ENV == "GATEWAY_API_KEYS"


def test_every_variable_follows_the_one_rule():
    assert env_name("--max-in-flight") == "MLFLOW_DSPY_MAX_IN_FLIGHT"
    assert env_name("--no-traces") == "MLFLOW_DSPY_TRACES"
    for setting in WITH_FLAGS:
        assert setting.env == env_name(setting.flag), setting.name
    # The names that were there before the table keep their meaning.
    assert BY_NAME["speedups"].env == "MLFLOW_DSPY_SPEEDUPS"
    assert BY_NAME["embedded_parallel"].env == "MLFLOW_DSPY_EMBEDDED_PARALLEL"
    assert BY_NAME["embedded_cache_mb"].env == "MLFLOW_DSPY_EMBEDDED_CACHE_MB"
    assert BY_NAME["embedded_queue"].env == "MLFLOW_DSPY_EMBEDDED_QUEUE"


def test_the_command_line_has_exactly_the_tables_flags_with_their_help():
    actions = [a for a in gateway_parser()._actions if a.dest != "help"]
    assert sorted(a.dest for a in actions) == sorted(s.name for s in WITH_FLAGS)
    for action in actions:
        setting = BY_NAME[action.dest]
        assert tuple(action.option_strings) == setting.flags
        assert action.default is None  # not given: the variable, else the default, applies
        assert f"${setting.env}" in action.help and setting.help in action.help
    text = gateway_parser().format_help()
    assert "(default: 64; $MLFLOW_DSPY_MAX_IN_FLIGHT)" in text and "GATEWAY_API_KEYS" in text


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_a_variable_reaches_the_workers_config_and_a_flag_wins_over_it(setting, monkeypatch):
    value = other_value(setting)
    monkeypatch.setenv(setting.env, setting.text(value))
    # A worker (GatewayConfig.from_env, what app_from_env builds the app from) sees the variable.
    assert getattr(GatewayConfig.from_env(), setting.name) == value
    if not setting.flags:
        return
    # Neither flag nor variable: the default.
    assert getattr(from_command_line([]), setting.name) == setting.default
    # The variable alone, read by the command line.
    assert getattr(from_command_line([], {setting.env: setting.text(value)}), setting.name) == value
    # The flag over the variable (a switch has one other value: its flag over the variable's default).
    env = {setting.env: setting.text(setting.default if setting.kind == "switch" else other_value_again(setting))}
    assert getattr(from_command_line(flags_for(setting, value), env), setting.name) == value


def other_value_again(setting: Setting) -> Any:
    value = other_value(setting)
    if setting.kind == "list":
        return ("third=a:1,b:1",) if setting.name == "splits" else ("three",)
    if setting.kind == "str":
        return value + "-too"
    return setting.default if setting.default is not None else value + 1


def test_the_launcher_hands_every_setting_to_its_workers(monkeypatch):
    argv = [arg for s in WITH_FLAGS for arg in flags_for(s, other_value(s))]
    config = from_command_line(argv)
    written = config.environment()
    assert API_KEYS_ENV not in written  # keys are never written anywhere
    for name, text in written.items():
        monkeypatch.setenv(name, text)
    monkeypatch.setenv(API_KEYS_ENV, "sk-1, sk-2")
    worker = GatewayConfig.from_env()
    assert worker == dataclasses.replace(config, api_keys=("sk-1", "sk-2"))
    assert worker.load_before_serving  # more than one worker: each loads before it accepts
    # The lower rooms read their own variables in each worker, and find the same values.
    assert HeaderLimits.from_env() == config.header_limits()
    embedded = EmbeddedSettings.from_env()
    assert (embedded.parallel, embedded.cache_mb, embedded.queue) == (
        config.embedded_parallel, config.embedded_cache_mb, config.embedded_queue)


def test_settings_left_alone_keep_the_lower_rooms_defaults(monkeypatch):
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    untouched = EmbeddedSettings.from_env()
    for name, text in DEFAULTS.environment().items():  # what a launcher with no flag and no variable writes
        monkeypatch.setenv(name, text)
    assert HeaderLimits.from_env() == HeaderLimits()
    assert EmbeddedSettings.from_env() == untouched


def test_naming_what_to_serve_on_the_command_line_sets_the_environments_choice_aside():
    env = {"MLFLOW_DSPY_MODEL_URI": "models:/dspy-qa@champion", "MLFLOW_DSPY_LM": "openai/x"}
    config = from_command_line(["--program", "qa"], env)
    assert (config.model_uris, config.program, config.lm) == ((), "qa", "openai/x")
    config = from_command_line(["-m", "models:/dspy-qa/2"], {"MLFLOW_DSPY_PROGRAM": "qa"})
    assert (config.model_uris, config.program) == (("models:/dspy-qa/2",), None)
    # Spaces separate a list's values too (a YAML block in a ConfigMap).
    config = from_command_line([], {"MLFLOW_DSPY_MODEL_URI": "models:/a/1,\n  models:/b/2 "})
    assert config.model_uris == ("models:/a/1", "models:/b/2")


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--trace-sample", "2"], {}, "--trace-sample must be from 0 to 1, not 2"),
    ([], {"MLFLOW_DSPY_TRACE_SAMPLE": "1.5"}, "$MLFLOW_DSPY_TRACE_SAMPLE must be from 0 to 1, not 1.5"),
    (["--embedded-parallel", "0"], {}, "--embedded-parallel must be at least 1, not 0"),
    (["--embedded-cache-mb", "-1"], {}, "--embedded-cache-mb must be at least 0, not -1"),
    ([], {"MLFLOW_DSPY_EMBEDDED_QUEUE": "-2"}, "$MLFLOW_DSPY_EMBEDDED_QUEUE must be at least 0, not -2"),
    ([], {"MLFLOW_DSPY_MAX_IN_FLIGHT": "lots"}, "MLFLOW_DSPY_MAX_IN_FLIGHT must be a whole number, not 'lots'"),
    ([], {"MLFLOW_DSPY_TRACES": "maybe"}, "MLFLOW_DSPY_TRACES is 1 or 0 (on or off), not 'maybe'"),
    (["--request-timeout", "nan"], {}, "--request-timeout must be a finite number, not nan"),
    ([], {"MLFLOW_DSPY_PORT": "70000"}, "$MLFLOW_DSPY_PORT must be from 0 to 65535, not 70000"),
    (["-m", "models:/a/1"], {"MLFLOW_DSPY_PROGRAM": ""}, None),  # an empty variable is no variable
    (["-m", "models:/a/1", "--program", "qa"], {}, "or --program PROGRAM, not both"),
    ([], {"MLFLOW_DSPY_MODEL_URI": "models:/a/1", "MLFLOW_DSPY_PROGRAM": "qa"}, "or --program PROGRAM, not both"),
    (["-m", "models:/a/1", "-m", "models:/b/1", "--name", "x"], {}, "--name names one model"),
])
def test_a_setting_out_of_its_rules_is_one_line_and_exit_2(argv, env, expected, monkeypatch, capsys):
    for name in [s.env for s in SETTINGS]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if expected is None:  # valid: it gets as far as the model's URI, checked against the registry
        def stop(uri: str) -> None:
            raise cli.UsageProblem(f"stopped at {uri}")

        monkeypatch.setattr(cli, "_check_model_uri", stop)
        expected = "stopped at models:/a/1"
    assert cli.main(["gateway", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlflow-dspy gateway: ") and expected in err and err.count("\n") == 1


def test_a_gateway_configured_by_its_environment_alone(workers_gateway):
    """Kubernetes-style: `mlflow-dspy gateway` with no flag but the port; two worker processes, each
    rebuilding its configuration (and the HTTP protocol's header limits) from the variables (conftest's
    WORKERS_ENV: MLFLOW_DSPY_WORKERS=2, MLFLOW_DSPY_MAX_MESSAGES=1, MLFLOW_DSPY_MAX_HEADER_LINE_BYTES=2000)."""
    base = workers_gateway.url
    two = {"model": "dspy-qa", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    # Each request on a connection of its own, so that both workers (one socket) may take some; a refused
    # header closes its connection anyway.
    statuses = {httpx.post(f"{base}/v1/chat/completions", json=two, timeout=30).status_code for _ in range(6)}
    long_header = {httpx.get(f"{base}/health", headers={"X-Long": "a" * 3000}).status_code for _ in range(4)}
    models = httpx.get(f"{base}/v1/models").json()
    assert statuses == {400}  # over MLFLOW_DSPY_MAX_MESSAGES=1
    assert long_header == {431}  # over MLFLOW_DSPY_MAX_HEADER_LINE_BYTES=2000 (the default is 8 KiB)
    assert [m["id"] for m in models["data"]] == ["dspy-qa"]
