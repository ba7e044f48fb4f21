"""Start the gateway under uvicorn, with one worker or several."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import uvicorn

from mlflow_dspy.gateway.config import CONFIG_ENV, GatewayConfig
from mlflow_dspy.gateway.metrics import MULTIPROC_ENV
from mlflow_dspy.internals import SPEEDUPS_ENV
from mlflow_dspy.internals.header_limits import LIMITS_ENV
from mlflow_dspy.lm_engine.embedded_settings import settings_environment


def config_of(args: argparse.Namespace) -> GatewayConfig:
    """The configuration the command line asks for (every default is GatewayConfig's)."""
    return GatewayConfig(
        model_uris=tuple(args.model_uri or ()),
        splits=tuple(args.split or ()),
        reload_interval=args.reload_interval,
        program=args.program,
        lm=args.lm,
        served_name=args.name,
        max_in_flight=args.max_in_flight,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_header_line_bytes=args.max_header_line_bytes,
        header_timeout=args.header_timeout,
        max_messages=args.max_messages,
        max_characters=args.max_characters,
        cors_origins=tuple(args.allow_origin or ()),
        request_timeout=args.request_timeout,
        traces=not args.no_traces,
        trace_sample=args.trace_sample,
        trace_flush_timeout=args.trace_flush_timeout,
        embedded_parallel=args.embedded_parallel,
        embedded_cache_mb=args.embedded_cache_mb,
        embedded_queue=args.embedded_queue,
        speedups=not args.no_speedups,
        load_before_serving=args.workers > 1,
    )


def run_gateway(args: argparse.Namespace) -> int:
    config = config_of(args)
    if config.traces:
        # Create the store's tables and the experiment once, here: several workers doing it at once race on
        # the SQLite schema. A store that fails turns tracing off; it does not stop the gateway.
        from mlflow_dspy.packaging.log import use_tracking_store

        try:
            use_tracking_store()
        except Exception as exc:
            print(f"mlflow-dspy gateway: tracing is off: the tracking store failed ({type(exc).__name__})",
                  file=sys.stderr, flush=True)
            config.traces = False
    # Workers are separate processes: they rebuild the app from this variable
    # (API keys stay in GATEWAY_API_KEYS and are read by each worker).
    os.environ[CONFIG_ENV] = config.to_env()
    os.environ[LIMITS_ENV] = config.header_limits().to_env()  # read by the HTTP protocol, in each worker
    # Read where the embedded model is first used, in each worker.
    os.environ.update(settings_environment(config.embedded_parallel, config.embedded_cache_mb, config.embedded_queue))
    if not config.speedups:
        os.environ[SPEEDUPS_ENV] = "0"  # read where each speed-up is chosen (mlflow_dspy/internals)
    if args.workers > 1:
        # Each worker writes its metrics to files here; /metrics adds up every worker's (gateway/metrics.py).
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="mlflow-dspy-metrics-")
    from mlflow_dspy.internals.uvicorn_protocol import http_protocol

    uvicorn.run(
        "mlflow_dspy.gateway.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=http_protocol(),  # header limits; with the speed-ups, a response's headers and body in one write
        log_level="warning",
        access_log=False,  # the gateway writes its own structured line per request
        timeout_graceful_shutdown=10,
    )
    return 0
