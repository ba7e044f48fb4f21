"""The gateway's settings, each declared once, and the configuration object the gateway reads.

`GatewayConfig`'s fields are the table: each one that is a setting carries its
`Setting` (its flags, its help, its range) in the field's metadata, next to its
name, its type (the annotation) and its default. From that one table:

* the command line generates `mlflow-dspy gateway`'s flags (cli.py);
* every setting has an environment variable, `MLFLOW_DSPY_` and the flag's long
  name in capitals with dashes as underscores (`--max-in-flight`:
  `MLFLOW_DSPY_MAX_IN_FLIGHT`; a `--no-X` switch: `MLFLOW_DSPY_X=0`); only the
  API keys have no flag and keep their own variable, `GATEWAY_API_KEYS`;
* a value comes from the flag, else from the variable, else the default
  (`GatewayConfig.resolve`), and is checked against its setting's range;
* the launcher writes every setting's variable for its workers (`environment`),
  which, being processes, rebuild the same configuration (`from_env`); the
  lower rooms that run in those processes (the embedded model, the HTTP
  protocol's header limits, the speed-ups' switch) read their own variables,
  whose names and defaults this table takes from them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mlflow_dspy.internals import SPEEDUPS_ENV
from mlflow_dspy.internals.header_limits import (
    HEADER_BYTES_ENV,
    HEADER_LINE_BYTES_ENV,
    HEADER_TIMEOUT_ENV,
    HeaderLimits,
)
from mlflow_dspy.lm_engine import embedded_settings as embedded
from mlflow_dspy.program.problems import UserProblem

PREFIX = "MLFLOW_DSPY_"
API_KEYS_ENV = "GATEWAY_API_KEYS"
SWITCH_ON, SWITCH_OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")

# Open without a key even when keys are set: probes (Kubernetes, load balancers, Prometheus) carry none,
# and these answer nothing a key protects (alive, loaded and the model's name, counters).
OPEN_ROUTES = ("/health", "/ready", "/metrics")

# What to serve: given on the command line, any of these replaces all of them from the environment.
SOURCES = ("model_uris", "splits", "program")


class SettingProblem(UserProblem):
    """A gateway setting that cannot be used: not of its type, out of its range, or at odds with another."""


@dataclass(frozen=True)
class Setting:
    """One setting of the gateway: how it is given (flags, variable), described (help) and checked (range).

    `name`, `kind` and `default` are filled in from the GatewayConfig field that carries it."""

    help: str
    flags: tuple[str, ...] = ()  # none: the environment only (the API keys, which never go on a command line)
    env: str = ""  # "": by the rule, from the flag's long name
    metavar: str | None = None
    least: float | None = None
    most: float | None = None
    separator: str = ","  # between a list's values in its variable (spaces separate them too)
    shown_default: str | None = None  # what --help says when the default is None or worked out per machine
    name: str = ""
    kind: str = ""  # "int", "float", "str", "switch" (a bool, given as --no-X) or "list" (a repeatable flag)
    default: Any = None

    @property
    def flag(self) -> str:
        """The flag that names this setting in messages (its long one)."""
        return self.flags[-1] if self.flags else self.env

    def parse(self, raw: str) -> Any:
        """The value a variable gives (its text as the environment holds it); empty: the default."""
        text = raw.strip()
        if not text:
            return self.default
        if self.kind == "list":
            return tuple(part for part in re.split(rf"[\s{re.escape(self.separator)}]+", text) if part)
        if self.kind == "switch":
            if text.lower() in SWITCH_ON + SWITCH_OFF:
                return text.lower() in SWITCH_ON
            raise SettingProblem(f"{self.env} is 1 or 0 (on or off), not {raw!r}")
        if self.kind == "str":
            return text
        try:
            return int(text) if self.kind == "int" else float(text)
        except ValueError:
            what = "a whole number" if self.kind == "int" else "a number"
            raise SettingProblem(f"{self.env} must be {what}, not {raw!r}") from None

    def text(self, value: Any) -> str:
        """`value` as this setting's variable holds it (`parse` reads it back); None or nothing: empty."""
        if value is None:
            return ""
        if self.kind == "list":
            return self.separator.join(value)
        if self.kind == "switch":
            return "1" if value else "0"
        return str(value)

    def check(self, value: Any, source: str) -> None:
        """A value out of this setting's range, from `source` (a flag or a variable), is a SettingProblem."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if not math.isfinite(value):
            raise SettingProblem(f"{source} must be a finite number, not {value}")
        if self.least is not None and self.most is not None and not self.least <= value <= self.most:
            raise SettingProblem(f"{source} must be from {self.least:g} to {self.most:g}, not {value:g}")
        if self.least is not None and value < self.least:
            raise SettingProblem(f"{source} must be at least {self.least:g}, not {value:g}")
        if self.most is not None and value > self.most:
            raise SettingProblem(f"{source} must be at most {self.most:g}, not {value:g}")

    def describe(self) -> str:
        """The help the command line shows: what it does, its default and its variable."""
        if self.kind == "switch":
            return f"{self.help} (or ${self.env}=0)"
        shown = self.shown_default
        if shown is None:
            shown = "none" if self.default in (None, ()) else f"{self.default:g}" if self.kind == "float" \
                else str(self.default)
        return f"{self.help} (default: {shown}; ${self.env})"


def setting(default: Any, *flags: str, help: str, **rest: Any) -> Any:
    """A GatewayConfig field that is a setting: its default, its flags and the rest of its Setting."""
    return field(default=default, metadata={"setting": Setting(help=help, flags=flags, **rest)})


@dataclass
class GatewayConfig:
    """What one gateway serves and how: every field but `load_before_serving` is a setting (see above)."""

    # What to serve.
    model_uris: tuple[str, ...] = setting(
        (), "-m", "--model-uri", metavar="URI",
        help="runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>; repeat it to serve several "
             "(models:/NAME@champion also answers as NAME; in the variable, separated by commas)")
    splits: tuple[str, ...] = setting(
        (), "--split", metavar="NAME=ALIAS:WEIGHT,ALIAS:WEIGHT", separator=";",
        help="send requests for NAME to its aliases by weight, e.g. triage=champion:90,challenger:10 (a "
             "request's user or x-session-id always gets the same alias; repeatable; in the variable, separated "
             "by semicolons)")
    program: str | None = setting(
        None, "--program", metavar="PROGRAM",
        help="serve a program straight from its code: what `log` takes (an example such as qa, a program in "
             "your pyproject.toml, package.module:attr or file.py:attr)")
    lm: str | None = setting(
        None, "--lm", metavar="MODEL", shown_default="the project's, else $DSPY_LM, else the embedded model",
        help="with --program: the LM, e.g. openai/gpt-4o-mini")
    served_name: str | None = setting(
        None, "--name", metavar="NAME", shown_default="the registry's name",
        help="with one model: the name clients send and /v1/models lists")
    trust_keys: tuple[str, ...] = setting(
        (), "--trust-key", metavar="PUBKEY", shown_default="none: manifests checked, unsigned "
        "models served",
        help="serve only model versions whose manifest is signed by this Ed25519 public key (a PEM file, or "
             "ed25519:BASE64; repeatable; in the variable, separated by commas); any other version is refused, and "
             "on a hot reload the old one keeps serving")
    reload_interval: float = setting(
        30.0, "--reload-interval", metavar="SECONDS", least=0,
        help="seconds between looks at the registry's aliases; a moved alias loads in the background and takes "
             "over once it answers; 0: never")
    # Where and how many processes (the launcher's; workers are told them too).
    host: str = setting("127.0.0.1", "--host", metavar="ADDRESS", help="the address to listen on")
    port: int = setting(8000, "--port", metavar="PORT", least=0, most=65535, help="the port to listen on")
    workers: int = setting(1, "--workers", metavar="N", least=1,
                           help="uvicorn worker processes, each loading the model before it accepts")
    # Limits on each request.
    max_in_flight: int = setting(64, "--max-in-flight", metavar="N", least=1,
                                 help="requests running at once per worker; more get 429")
    max_body_bytes: int = setting(1 << 20, "--max-body-bytes", metavar="BYTES", least=1,
                                  help="a larger body gets 413")
    max_header_bytes: int = setting(
        HeaderLimits.max_header_bytes, "--max-header-bytes", env=HEADER_BYTES_ENV, metavar="BYTES", least=1,
        help="a larger header section gets 431")
    max_header_line_bytes: int = setting(
        HeaderLimits.max_header_line_bytes, "--max-header-line-bytes", env=HEADER_LINE_BYTES_ENV, metavar="BYTES",
        least=1, help="a longer header line gets 431")
    header_timeout: float = setting(
        HeaderLimits.header_timeout, "--header-timeout", env=HEADER_TIMEOUT_ENV, metavar="SECONDS", least=0,
        help="seconds a request's headers may take to arrive before the connection closes")
    max_messages: int = setting(200, "--max-messages", metavar="N", least=1, help="more messages get 400")
    max_characters: int = setting(50_000, "--max-characters", metavar="N", least=1,
                                  help="more characters of message text get 400")
    request_timeout: float = setting(120.0, "--request-timeout", metavar="SECONDS", least=0,
                                     help="seconds a program may run before 504")
    graceful_timeout: float = setting(
        30.0, "--graceful-timeout", metavar="SECONDS", least=0,
        help="on SIGTERM or Ctrl-C: seconds the requests and streams in flight may take to finish (new connections "
             "are refused); those still running then end with an error (a stream: its error event and end)")
    cors_origins: tuple[str, ...] = setting(
        (), "--allow-origin", metavar="ORIGIN", shown_default="none: CORS off",
        help="let browser pages from ORIGIN call the gateway (CORS; repeatable; in the variable, separated by "
             "commas)")
    # Traces.
    traces: bool = setting(True, "--no-traces",
                           help="do not record an MLflow trace per request, as is done by default")
    trace_sample: float = setting(1.0, "--trace-sample", metavar="RATE", least=0, most=1,
                                  help="the fraction of requests traced, 0 to 1")
    trace_flush_timeout: float = setting(
        10.0, "--trace-flush-timeout", metavar="SECONDS", least=0,
        help="seconds a graceful stop gives the traces still queued; what is left then is counted as dropped")
    trace_queue: int = setting(
        2000, "--trace-queue", metavar="N", least=1,
        help="traces waiting for the tracking store, per worker; past it they are dropped (and counted)")
    # Feedback (POST /v1/feedback), per worker: a flood of it must not reach the tracking store, or the requests.
    feedback_rate: float = setting(
        10.0, "--feedback-rate", metavar="PER_SECOND", least=0.01,
        help="feedback posts a second each API key (or, without keys, all callers together) may send to one "
             "worker, in bursts of up to --feedback-burst; more get 429 with Retry-After")
    feedback_burst: int = setting(20, "--feedback-burst", metavar="N", least=1,
                                  help="feedback posts a key may send at once before --feedback-rate applies")
    feedback_in_flight: int = setting(
        4, "--feedback-in-flight", metavar="N", least=1,
        help="feedback posts being written to the tracking store at once, per worker; more get 429")
    # The embedded model, when a served program uses it (None: lm_engine/embedded_settings' default).
    embedded_parallel: int | None = setting(
        None, "--embedded-parallel", env=embedded.PARALLEL_ENV, metavar="N",
        least=embedded.LEAST[embedded.PARALLEL_ENV],
        shown_default=f"two per core, 2 to 8; {embedded.default_parallel()} here",
        help="embedded model: requests decoded together in one batch; more wait in its queue")
    embedded_cache_mb: float | None = setting(
        None, "--embedded-cache-mb", env=embedded.CACHE_MB_ENV, metavar="MB",
        least=embedded.LEAST[embedded.CACHE_MB_ENV], shown_default=f"{embedded.DEFAULT_CACHE_MB:g}",
        help="embedded model: memory for the saved state of programs' fixed prompt prefixes, least recently used "
             "dropped first; 0 turns it off")
    embedded_queue: int | None = setting(
        None, "--embedded-queue", env=embedded.QUEUE_ENV, metavar="N", least=embedded.LEAST[embedded.QUEUE_ENV],
        shown_default=f"{embedded.QUEUE_PER_SEQUENCE} per sequence",
        help="embedded model: requests that may wait for a free sequence; more get 429 with Retry-After")
    embedded_threads: int | None = setting(
        None, "--embedded-threads", env=embedded.THREADS_ENV, metavar="N", least=embedded.LEAST[embedded.THREADS_ENV],
        shown_default=f"one per CPU this process may use; {embedded.default_threads()} here",
        help="embedded model: llama.cpp's threads for decoding and prompts (fewer leave cores to other work)")
    speedups: bool = setting(
        True, "--no-speedups", env=SPEEDUPS_ENV,
        help="run DSPy's and uvicorn's own code paths instead of the speed-ups built on their internals "
             "(mlflow_dspy/internals; same answers, slower)")
    api_keys: tuple[str, ...] = setting(
        (), env=API_KEYS_ENV,
        help="keys a request must bear (Authorization: Bearer KEY) on every route but /health and /ready; "
             "comma-separated, each KEY or NAME:KEY (the name is the caller's identity, e.g. feedback's source; "
             "an unnamed key is named key-<the first 8 hex digits of its SHA-256>); only ever from the environment")
    # Several workers share one listening socket: each must load before it accepts, or a client
    # that saw /ready from one worker gets 503 from the next. One worker loads in the background
    # instead, so /health answers at once. Not a setting: it follows from `workers` (see resolve).
    load_before_serving: bool = False

    @classmethod
    def resolve(cls, given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
                ) -> GatewayConfig:
        """Each setting from `given` (the command line's values by field name, as argparse's namespace holds
        them; None: not given; other keys ignored), else from its variable in `environ` (default: os.environ),
        else its default; each checked against its range.

        Naming what to serve on the command line (-m, --split or --program) sets aside all three variables."""
        given = given or {}
        environ = os.environ if environ is None else environ
        named_here = any(given.get(name) for name in SOURCES)
        values: dict[str, Any] = {}
        for item in SETTINGS:
            value = given.get(item.name)
            if value is not None and item.kind == "list":
                value = tuple(value)
            if value is not None and value != ():
                source = item.flag
            elif named_here and item.name in SOURCES:
                value, source = item.default, item.flag
            else:
                value, source = item.parse(environ.get(item.env, "")), f"${item.env}"
            item.check(value, source)
            values[item.name] = value
        return cls(**values, load_before_serving=values["workers"] > 1)

    @classmethod
    def from_env(cls) -> GatewayConfig:
        """The configuration a worker is given: every setting from its variable (the launcher wrote them all)."""
        return cls.resolve({}, os.environ)

    def check(self) -> None:
        """The rules between settings: one thing to serve, and --name only with a single model."""
        if bool(self.model_uris or self.splits) == bool(self.program):
            raise SettingProblem(
                "give -m MODEL_URI (one or more, or --split) or --program PROGRAM, not both (or set one of "
                f"${BY_NAME['model_uris'].env}, ${BY_NAME['splits'].env}, ${BY_NAME['program'].env})")
        if self.served_name and len(self.model_uris) > 1:
            raise SettingProblem("--name names one model; with several, each is served under its registry name")
        named_keys(self.api_keys)  # two keys of one name: refused at start-up, not by each worker

    def environment(self) -> dict[str, str]:
        """Every setting as its variable, for the worker processes (`from_env` reads them back); not the
        API keys, which are read from the environment and never written anywhere."""
        return {item.env: item.text(getattr(self, item.name)) for item in SETTINGS if item.flags}

    def uris(self) -> list[str]:
        return list(self.model_uris)

    def limits(self) -> Limits:
        """What admission.py enforces before a request reaches a route."""
        return Limits(max_in_flight=self.max_in_flight, max_body_bytes=self.max_body_bytes, api_keys=self.api_keys)

    def header_limits(self) -> HeaderLimits:
        """What the HTTP protocol enforces while the request's headers arrive."""
        return HeaderLimits(self.max_header_line_bytes, self.max_header_bytes, self.header_timeout)


def env_name(flag: str) -> str:
    """The rule for a setting's variable: `--max-in-flight` -> MLFLOW_DSPY_MAX_IN_FLIGHT, `--no-traces` ->
    MLFLOW_DSPY_TRACES (set to 0 to turn it off)."""
    return PREFIX + flag.removeprefix("--").removeprefix("no-").upper().replace("-", "_")


def _table() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(GatewayConfig)
    kinds = {bool: "switch", int: "int", float: "float", str: "str", tuple[str, ...]: "list"}
    table = []
    for item in fields(GatewayConfig):
        if "setting" not in item.metadata:
            continue
        hint = hints[item.name]
        bare = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint) \
            if typing.get_origin(hint) is not tuple else hint
        declared: Setting = item.metadata["setting"]
        table.append(replace(declared, name=item.name, kind=kinds[bare], default=item.default,
                             env=declared.env or env_name(declared.flag)))
    return tuple(table)


SETTINGS = _table()
BY_NAME = {item.name: item for item in SETTINGS}
DEFAULTS = GatewayConfig()


@dataclass(frozen=True)
class ApiKey:
    """One of GATEWAY_API_KEYS: the key, and the name of whoever bears it (the caller's identity)."""

    name: str
    key: bytes = field(repr=False)


# The caller's identity when the gateway has no keys: anyone.
ANONYMOUS = "anonymous"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def named_keys(entries: tuple[str, ...]) -> tuple[ApiKey, ...]:
    """GATEWAY_API_KEYS's entries as named keys: `NAME:KEY` names its key; a bare `KEY` (or one whose part
    before a colon is not a name) is named `key-` and the first 8 hex digits of its SHA-256, which says
    which key it was without saying the key. Two keys of one name, or a key named `anonymous`, are refused."""
    keys: list[ApiKey] = []
    for entry in entries:
        name, colon, key = entry.partition(":")
        if not colon or not key or not KEY_NAME.fullmatch(name):
            name, key = f"key-{hashlib.sha256(entry.encode()).hexdigest()[:8]}", entry
        if name == ANONYMOUS or name in [k.name for k in keys]:
            raise SettingProblem(f"{API_KEYS_ENV}: two keys are named {name!r}, or a key is named anonymous "
                                 "(the name of callers without a key): give each key a name of its own")
        keys.append(ApiKey(name, key.encode()))
    return tuple(keys)


@dataclass
class Limits:
    """What admission.py enforces before a request reaches a route."""

    max_in_flight: int = DEFAULTS.max_in_flight
    max_body_bytes: int = DEFAULTS.max_body_bytes
    retry_after_seconds: int = 1
    body_timeout_seconds: float = 30.0
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    open_routes: tuple[str, ...] = OPEN_ROUTES
    keys: tuple[ApiKey, ...] = field(init=False, repr=False)  # api_keys, named (`named_keys`)

    def __post_init__(self) -> None:
        self.keys = named_keys(self.api_keys)
