"""`make ui` starts the MLflow UI over the tracking store, offline, and it
lists the registered model and the logged model's artifacts."""

import pytest

from tests.conftest import store_env
from tests.support.processes import free_port, running

pytestmark = pytest.mark.slow


def test_make_ui_serves_the_store(embedded_qa, embedded_store, tmp_path):
    import httpx

    port = free_port()
    env = store_env(embedded_store)
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # the Makefile must set it: offline, mlflow ui hangs without it
    with running(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], f"http://127.0.0.1:{port}/health",
                 env, tmp_path / "ui.log", timeout=240):
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        models = httpx.get(f"{base}/registered-models/search", timeout=30).json()["registered_models"]
        assert [m["name"] for m in models] == ["dspy-qa"]
        run = httpx.get(f"{base}/runs/get", params={"run_id": embedded_qa["run_id"]}, timeout=30).json()["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["program"] == "qa"
        logged = httpx.post(f"{base}/logged-models/search",
                            json={"experiment_ids": [run["info"]["experiment_id"]]}, timeout=30).json()
        [model] = logged["models"]
        files = httpx.get(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/logged-models/{model['info']['model_id']}"
                          "/artifacts/directories", timeout=30)
        names = {f["path"] for f in files.json().get("files", [])}
        assert {"MLmodel", "requirements.txt", "conda.yaml", "code", "data"} <= names
