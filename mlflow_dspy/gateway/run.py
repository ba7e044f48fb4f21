"""Start the gateway under uvicorn, with one worker or several."""

from __future__ import annotations

import argparse
import os
import tempfile

import uvicorn

from mlflow_dspy.gateway.app import CONFIG_ENV, GatewayConfig
from mlflow_dspy.gateway.http_protocol import LIMITS_ENV, CoalescingHttpToolsProtocol, HeaderLimits
from mlflow_dspy.gateway.metrics import MULTIPROC_ENV


def run_gateway(args: argparse.Namespace) -> int:
    config = GatewayConfig(
        model_uris=tuple(args.model_uri or ()),
        splits=tuple(args.split or ()),
        reload_interval=args.reload_interval,
        program=args.program,
        lm=args.lm,
        served_name=args.name,
        max_in_flight=args.max_in_flight,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_characters=args.max_characters,
        cors_origins=tuple(args.allow_origin or ()),
        request_timeout=args.request_timeout,
        traces=not args.no_traces,
        load_before_serving=args.workers > 1,
    )
    # Workers are separate processes: they rebuild the app from this variable
    # (API keys stay in GATEWAY_API_KEYS and are read by each worker).
    os.environ[CONFIG_ENV] = config.to_env()
    if args.workers > 1:
        # Each worker writes its metrics to files here; /metrics adds up every worker's (gateway/metrics.py).
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="mlflow-dspy-metrics-")
    os.environ[LIMITS_ENV] = HeaderLimits(args.max_header_line_bytes, args.max_header_bytes,
                                          args.header_timeout).to_env()
    if config.traces:
        # Create the store's tables and the experiment once, here: several
        # workers doing it at once race on the SQLite schema.
        from mlflow_dspy.packaging.log import use_tracking_store

        use_tracking_store()
    uvicorn.run(
        "mlflow_dspy.gateway.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=CoalescingHttpToolsProtocol,  # header limits; a response's headers and body in one write
        log_level="warning",
        access_log=False,  # the gateway writes its own structured line per request
        timeout_graceful_shutdown=10,
    )
    return 0
