"""The gateway's one configuration: every setting and its default, declared once.

The command line's flags take their defaults from here (cli.py reads
`DEFAULTS`); the middleware's limits and the HTTP protocol's header limits are
built from it (the header limits' defaults are the protocol's own, referred to
here), and workers, being separate processes, rebuild it from the environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from mlflow_dspy.internals.header_limits import HeaderLimits

CONFIG_ENV = "MLFLOW_DSPY_GATEWAY_CONFIG"

# Open without a key even when keys are set: probes (Kubernetes, load balancers, Prometheus) carry none,
# and these answer nothing a key protects (alive, loaded and the model's name, counters).
OPEN_ROUTES = ("/health", "/ready", "/metrics")


@dataclass
class Limits:
    """What the middleware enforces before a request reaches a route."""

    max_in_flight: int = 64
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1
    body_timeout_seconds: float = 30.0
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    open_routes: tuple[str, ...] = OPEN_ROUTES


@dataclass
class GatewayConfig:
    model_uri: str | None = None  # one model; `model_uris` for several
    model_uris: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()  # NAME=ALIAS:WEIGHT,ALIAS:WEIGHT (gateway/router.py)
    reload_interval: float = 30.0  # seconds between looks at the registry's aliases; 0: never
    program: str | None = None
    lm: str | None = None
    served_name: str | None = None
    # The limits' defaults: Limits (above) and the protocol's HeaderLimits.
    max_in_flight: int = Limits.max_in_flight  # requests running programs at once, per worker; more get 429
    max_body_bytes: int = Limits.max_body_bytes
    max_header_bytes: int = HeaderLimits.max_header_bytes  # a larger header section gets 431
    max_header_line_bytes: int = HeaderLimits.max_header_line_bytes  # a longer header line gets 431
    header_timeout: float = HeaderLimits.header_timeout  # seconds the headers may take; then the connection closes
    max_messages: int = 200
    max_characters: int = 50_000
    request_timeout: float = 120.0
    traces: bool = True
    trace_sample: float = 1.0  # the fraction of requests traced
    trace_flush_timeout: float = 10.0  # seconds a graceful stop gives the queued traces
    trace_queue: int = 2000  # traces waiting for the tracking store; past it they are dropped (and counted)
    # The embedded model (when a served program uses it): None takes lm_engine/embedded_settings' default.
    embedded_parallel: int | None = None  # requests decoded together
    embedded_cache_mb: float | None = None  # the prompt-prefix cache; 0 turns it off
    embedded_queue: int | None = None  # requests that may wait for a sequence; more get 429
    speedups: bool = True  # the speed-ups on DSPy's and uvicorn's internals (mlflow_dspy/internals)
    cors_origins: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    # Several workers share one listening socket: each must load before it accepts, or a client
    # that saw /ready from one worker gets 503 from the next. One worker loads in the background
    # instead, so /health answers at once.
    load_before_serving: bool = False

    def to_env(self) -> str:
        # Keys are not passed this way: workers read GATEWAY_API_KEYS themselves.
        return json.dumps({k: v for k, v in asdict(self).items() if k != "api_keys"})

    @classmethod
    def from_env(cls) -> GatewayConfig:
        config = cls(**json.loads(os.environ.get(CONFIG_ENV, "{}")))
        config.model_uris, config.splits = tuple(config.model_uris), tuple(config.splits)
        config.cors_origins = tuple(config.cors_origins)
        config.api_keys = api_keys_from_env()
        return config

    def uris(self) -> list[str]:
        return list(self.model_uris) or ([self.model_uri] if self.model_uri else [])

    def limits(self) -> Limits:
        """What the middleware enforces before a request reaches a route."""
        return Limits(max_in_flight=self.max_in_flight, max_body_bytes=self.max_body_bytes, api_keys=self.api_keys)

    def header_limits(self) -> HeaderLimits:
        """What the HTTP protocol enforces while the request's headers arrive."""
        return HeaderLimits(self.max_header_line_bytes, self.max_header_bytes, self.header_timeout)


DEFAULTS = GatewayConfig()


def api_keys_from_env() -> tuple[str, ...]:
    return tuple(k.strip() for k in os.environ.get("GATEWAY_API_KEYS", "").split(",") if k.strip())
