"""Start the gateway: uvicorn, with one worker process or several, each building the app from the environment.

A graceful stop (SIGTERM, Ctrl-C): new connections are refused (internals/uvicorn_server.py; one accepted just
before gets a 503, internals/uvicorn_protocol.py), what is in flight has --graceful-timeout to finish and
what has not by then ends with its protocol's error (app.Gateway.stop_gracefully), then the queued traces get
--trace-flush-timeout. uvicorn's own limit comes `STOP_MARGIN` seconds after ours, for what no run holds.
"""

from __future__ import annotations

import os
import sys
import tempfile

import uvicorn

from mlflow_dspy.gateway.config import GatewayConfig
from mlflow_dspy.gateway.feedback_tokens import SECRET_ENV, new_secret
from mlflow_dspy.gateway.metrics import MULTIPROC_ENV

# Seconds between the end of --graceful-timeout and uvicorn cancelling whatever still runs (then answered
# with a JSON 503 by Gateway.serve): the runs cut at --graceful-timeout need only to send their last event.
STOP_MARGIN = 2.0


def run_gateway(config: GatewayConfig) -> int:
    """Serve `config` until stopped (SIGTERM, Ctrl-C); its settings reach every worker as their variables."""
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
    if config.traces and not os.environ.get(SECRET_ENV, "").strip():
        # Every worker must sign and check the answers' feedback tokens with the same secret: one made here.
        os.environ[SECRET_ENV] = new_secret()
        print(f"mlflow-dspy gateway: {SECRET_ENV} is not set: feedback tokens are signed with a secret made for "
              "this run; they stop working at a restart, and another replica refuses them (set it, the same on "
              "every replica, to keep them)", file=sys.stderr, flush=True)
    # Workers are separate processes: each rebuilds this configuration from these variables
    # (GatewayConfig.from_env), and the embedded model, the header limits and the speed-ups' switch read
    # theirs where they are used. API keys stay in GATEWAY_API_KEYS, read by each worker.
    os.environ.update(config.environment())
    if config.workers > 1:
        # Each worker writes its metrics to files here; /metrics adds up every worker's (gateway/metrics.py).
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="mlflow-dspy-metrics-")
    from mlflow_dspy.internals.uvicorn_protocol import http_protocol
    from mlflow_dspy.internals.uvicorn_server import serve

    return serve(uvicorn.Config(
        "mlflow_dspy.gateway.app:app_from_env",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        http=http_protocol(),  # header limits, the graceful stop; with the speed-ups, one write per response
        log_level="warning",
        access_log=False,  # the gateway writes its own structured line per request
        timeout_graceful_shutdown=config.graceful_timeout + STOP_MARGIN,  # type: ignore[arg-type]
    ))
