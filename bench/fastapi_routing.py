"""`mlflow-dspy gateway`, with the five program routes routed by FastAPI instead of served straight from their
endpoints, every other default kept: for the bench's figure behind that choice (bench/road_ab.py). One
worker only (the app is built in this process)."""

from __future__ import annotations

import sys

from mlflow_dspy import cli
from mlflow_dspy.gateway.app import Gateway


def _routed_by_fastapi(self: Gateway, path: str, endpoint, body, **documented) -> None:
    self.app.add_api_route(path, endpoint, methods=["POST"], **documented)


if __name__ == "__main__":
    Gateway._program_route = _routed_by_fastapi
    sys.exit(cli.main(["gateway", *sys.argv[1:]]))
