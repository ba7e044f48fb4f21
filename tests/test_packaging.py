"""Packaging that holds up outside this checkout: container files and Kubernetes manifests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from packager.requirements import pinned_requirements
from tests.conftest import store_env
from tests.support.processes import ROOT

K8S = ROOT / "deploy" / "k8s"


def manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("document", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_schema(document):
    kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_deployment_probes_resources_secret_and_config():
    by_kind = {doc["kind"]: doc for doc in manifests()}
    [container] = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    env = {item["name"]: item.get("valueFrom", {}) for item in container["env"]}
    assert env["OPENAI_API_KEY"]["secretKeyRef"]["name"] == "dspy-gateway"
    assert env["MLFLOW_TRACKING_URI"]["configMapKeyRef"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == by_kind["Deployment"]["metadata"][
        "name"]
    assert by_kind["Service"]["spec"]["selector"] == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]


def test_gateway_image_holds_every_package_the_gateway_imports(tmp_path):
    dockerfile = (ROOT / "deploy" / "Dockerfile.gateway").read_text()
    copied = re.findall(r"^COPY (\S+) \S+$", dockerfile, flags=re.M)
    for item in copied:
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / item)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in dockerfile
    assert "pip install -r requirements.txt" in dockerfile
    # Only what the image copies, nothing from this checkout: the gateway starts and says how to use it.
    proc = subprocess.run([sys.executable, "-E", "-s", "mlflow_dspy.py", "gateway", "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imports = subprocess.run([sys.executable, "-E", "-s", "-c", "import serving.app, serving.run, serving.host"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert imports.returncode == 0, imports.stderr


@pytest.mark.slow
def test_make_docker_writes_a_dockerfile_that_installs_the_pins_and_serves(embedded_qa, embedded_store, tmp_path):
    out = tmp_path / "docker"
    proc = subprocess.run([sys.executable, "mlflow_dspy.py", "docker", "-m", embedded_qa["model_uri"], "--out",
                           str(out)], cwd=ROOT, env=store_env(embedded_store), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no Docker engine on this machine" in proc.stdout  # this machine has only the docker client
    dockerfile = (out / "Dockerfile").read_text()
    install = dockerfile.index("_install_pyfunc_deps('/opt/ml/model'")
    assert dockerfile.index("build-essential cmake") < install
    assert dockerfile.index('CMAKE_ARGS="-DGGML_NATIVE=OFF"') < install
    assert "COPY model_dir/model /opt/ml/model" in dockerfile
    assert "C._serve(" in dockerfile.splitlines()[-1]
    model = out / "model_dir" / "model"
    assert (model / "requirements.txt").read_text().split() == pinned_requirements(ROOT / "requirements.txt")
    assert (model / "code" / "programs" / "chat.py").is_file()
