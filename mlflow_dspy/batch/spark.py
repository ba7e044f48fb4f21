"""Score rows on Spark (`local[*]` here, any cluster by master URL) with
`mapInPandas`; each executor's Python worker loads the model once."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from mlflow_dspy.batch.io import plain
from mlflow_dspy.batch.score import RESULT_COLUMNS, score_rows
from mlflow_dspy.packaging.integrity import COPIES_ENV
from mlflow_dspy.packaging.signing import TRUST_KEY_ENV, TrustKey, inline

SCHEMA = "row_id long, answer string, prediction string, error string"
_hosts: dict[str, Any] = {}  # per Python worker process: the model, loaded once


def _host(model_uri: str, env: dict[str, str]):
    if model_uri not in _hosts:
        os.environ.update(env)
        from mlflow_dspy.packaging.load import host_for_model

        _hosts[model_uri] = host_for_model(model_uri)
    return _hosts[model_uri]


def _partition_scorer(model_uri: str, env: dict[str, str], concurrency: int):
    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        host = _host(model_uri, env)
        for batch in batches:
            rows = [(int(i), json.loads(r)) for i, r in zip(batch["row_id"], batch["row"], strict=True)]
            results = asyncio.run(score_rows(host, rows, concurrency))
            yield pd.DataFrame(results, columns=list(RESULT_COLUMNS))

    return score


def score_on_spark(model_uri: str, todo: list[tuple[int, dict]], concurrency: int, master: str,
                   on_result: Callable[[dict[str, Any]], None],
                   trust: tuple[TrustKey, ...] | None = None) -> list[dict[str, Any]]:
    if not todo:
        return []
    from pyspark.sql import SparkSession

    from mlflow_dspy.packaging.paths import IMPORT_ROOT, tracking_uri

    # Workers import this package from where the driver does, and find the
    # tracking store the same way.
    package_parent = str(IMPORT_ROOT)
    env = {"MLFLOW_TRACKING_URI": tracking_uri(), "PYTHONPATH": package_parent,
           "LITELLM_LOCAL_MODEL_COST_MAP": os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "true")}
    for key in ("DSPY_LM_API_BASE", TRUST_KEY_ENV, COPIES_ENV):
        if key in os.environ:
            env[key] = os.environ[key]
    if trust:  # each worker verifies its own private copy against the same keys
        env[TRUST_KEY_ENV] = ",".join(inline(key.key) for key in trust)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    builder = SparkSession.builder.master(master).appName("mlflow-dspy-batch")
    builder = builder.config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
    for key, value in env.items():
        builder = builder.config(f"spark.executorEnv.{key}", value)
    spark = builder.getOrCreate()
    try:
        frame = pd.DataFrame({"row_id": [row_id for row_id, _ in todo],
                              "row": [json.dumps(plain(row), default=str) for _, row in todo]})
        partitions = max(1, min(len(todo), spark.sparkContext.defaultParallelism))
        scored = spark.createDataFrame(frame).repartition(partitions).mapInPandas(
            _partition_scorer(model_uri, env, concurrency), schema=SCHEMA
        )
        results = []
        for row in scored.toLocalIterator():
            result = row.asDict()
            on_result(result)
            results.append(result)
        return results
    finally:
        spark.stop()
