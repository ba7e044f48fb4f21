"""Packaging that holds up outside this checkout: container files and Kubernetes manifests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mlflow_dspy.packaging.requirements import model_requirements
from tests.support.cli import cli_in_process, store_env
from tests.support.processes import ROOT

K8S = ROOT / "deploy" / "k8s"


def manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str, name: str) -> dict:
    [doc] = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def gateway_manifests() -> dict[str, dict]:
    """The gateway's documents by kind (the tracking server's are named mlflow / mlflow-tracking)."""
    return {kind: manifest(kind, "dspy-gateway") for kind in ("Deployment", "ConfigMap", "Service",
                                                                "HorizontalPodAutoscaler")}


@pytest.mark.parametrize("document", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_schema(document):
    kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_deployment_probes_resources_secret_and_config():
    by_kind = gateway_manifests()
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


@pytest.mark.install  # builds the project's wheel, and runs the installed command in a child Python
def test_gateway_image_installs_this_project_and_runs_its_command(tmp_path):
    dockerfile = (ROOT / "deploy" / "Dockerfile.gateway").read_text()
    context = tmp_path / "context"
    for item, target in re.findall(r"^COPY (\S+) (\S+)$", dockerfile, flags=re.M):
        source, dest = ROOT / item, context / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():  # merged into what is there, like docker's COPY; .dockerignore drops caches
            shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, dest)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in dockerfile
    # The lock hash-checked, then the project without dependencies and without fetching a build backend.
    assert dockerfile.index("pip install --require-hashes -r requirements.txt") < dockerfile.index(
        "RUN pip install --no-deps --no-build-isolation .")
    [entrypoint] = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.M)
    assert json.loads(entrypoint)[:2] == ["mlflow-dspy", "gateway"]
    # Only what the image copies, nothing from this checkout: it builds the project (the venv's
    # setuptools is the pinned one: no isolation, so no index needed), and the installed gateway
    # starts and says how to use it.
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(context)],
                           cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = wheels.glob("mlflow_dspy-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                               cwd=tmp_path, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (site / "bin" / "mlflow-dspy").is_file()  # the console script the ENTRYPOINT runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prelude = f"import sys; sys.path.insert(0, {str(site)!r}); "
    proc = subprocess.run([sys.executable, "-E", "-s", "-c", prelude + "import mlflow_dspy.cli as cli; "
                           "sys.argv = ['mlflow-dspy', 'gateway', '--help']; sys.exit(cli.main())"],
                          cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    gateway_modules = "mlflow_dspy.gateway.app, mlflow_dspy.gateway.server, mlflow_dspy.runtime.host"
    imports = subprocess.run([sys.executable, "-E", "-s", "-c", prelude + f"import mlflow_dspy, {gateway_modules}; "
                              "print(mlflow_dspy.__file__)"], cwd=elsewhere, capture_output=True, text=True)
    assert imports.returncode == 0, imports.stderr
    assert Path(imports.stdout.strip()).parent == site / "mlflow_dspy"


def test_kubernetes_runs_the_installed_command():
    by_kind = gateway_manifests()
    [container] = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow-dspy", "gateway"]


def test_make_docker_writes_a_dockerfile_that_installs_the_pins_and_serves(embedded_qa, embedded_store, tmp_path):
    out = tmp_path / "docker"
    # In process: the subject is the Dockerfile and the model folder it writes.
    done = cli_in_process("docker", "-m", embedded_qa["model_uri"], "--out", str(out), env=store_env(embedded_store))
    assert done.code == 0, done.err[-2000:]
    assert "no Docker engine on this machine" in done.out  # this machine has only the docker client
    dockerfile = (out / "Dockerfile").read_text()
    install = dockerfile.index("_install_pyfunc_deps('/opt/ml/model'")
    assert dockerfile.index("build-essential cmake") < install
    assert dockerfile.index('CMAKE_ARGS="-DGGML_NATIVE=OFF"') < install
    assert "COPY model_dir/model /opt/ml/model" in dockerfile
    assert "C._serve(" in dockerfile.splitlines()[-1]
    model = out / "model_dir" / "model"
    assert (model / "requirements.txt").read_text().splitlines() == model_requirements()  # the lock's hashes
    # The model's pins hash-checked in a step of their own before MLflow's, and no unchecked mlflow install.
    assert dockerfile.index("pip install --require-hashes -r /opt/ml/model/requirements.txt") < install
    assert "RUN pip install mlflow==" not in dockerfile
    assert (model / "code" / "mlflow_dspy" / "program" / "chat.py").is_file()


GENERATED = """FROM python:3.11.7-slim
WORKDIR /opt/mlflow

# Install MLflow
RUN pip install mlflow==3.17.2

# Copy model to image and install dependencies
COPY model_dir/model /opt/ml/model
RUN python -c "from mlflow.models import container as C; C._install_pyfunc_deps('/opt/ml/model', """ \
    """install_mlflow=False, env_manager='local');"
"""


def test_the_model_image_installs_the_hashed_pins_in_their_own_step_before_mlflows_and_no_unchecked_mlflow():
    """MLflow's step puts its build tools on the hashed pins' command line, where pip refuses any it must fetch
    (tests/test_hash_locked_install.py shows pip's rules): the pins and the tools go in first, apart."""
    from mlflow_dspy.packaging.docker import patch_dockerfile

    hashed = patch_dockerfile(GENERATED, ["pip==23.2.1", "setuptools==84.2.1", "wheel"], hashed=True)
    lines = hashed.splitlines()
    deps = next(i for i, line in enumerate(lines) if "_install_pyfunc_deps" in line)
    [pins] = [i for i, line in enumerate(lines) if line.endswith("pip install --require-hashes -r /opt/ml/model/"
                                                                   "requirements.txt")]
    assert lines[pins].startswith("RUN grep '^pip==' /opt/ml/model/requirements.txt")  # the lock's pip first
    tools = lines.index("RUN pip install pip==23.2.1 setuptools==84.2.1 wheel")
    assert lines.index('ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"') < pins < tools < deps
    assert "mlflow==3.17.2" not in hashed and "# Install MLflow" not in hashed
    # A model whose requirements are pins alone (a user's line without a hash): the same steps, unchecked.
    plain = patch_dockerfile(GENERATED, ["pip==23.2.1"], hashed=False)
    assert "RUN pip install -r /opt/ml/model/requirements.txt" in plain and "--require-hashes" not in plain


# -- the team stack's topology: the manifests, the CLI and scripts/stack.py agree (issue 24) -----------------------
def _expand(args: list[str], container: dict) -> list[str]:
    """A container's args with each $(VAR) replaced by a sample of what the variable holds."""
    samples = {"MODEL_URI": "models:/dspy-qa@champion", "MLFLOW_BACKEND_STORE_URI": "mlflow-dspy+postgresql+psycopg2://u@db/mlflow",
               "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/path"}
    named = {item["name"] for item in container.get("env", [])} | {
        key for ref in container.get("envFrom", []) for key in manifest(
            "ConfigMap", ref["configMapRef"]["name"])["data"]}

    def one(match: re.Match) -> str:
        assert match[1] in named, f"$({match[1]}) is not in the container's environment"
        return samples[match[1]]

    return [re.sub(r"\$\((\w+)\)", one, arg) for arg in args]


def _flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("-")}


def test_the_gateway_deployment_runs_flags_and_variables_the_cli_knows():
    from mlflow_dspy.cli import build_parser
    from mlflow_dspy.gateway.config import SETTINGS, env_name

    [container] = manifest("Deployment", "dspy-gateway")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow-dspy", "gateway"]
    args = _expand(container["args"], container)
    parsed = build_parser().parse_args(["gateway", *args])  # an unknown flag or a bad value exits here
    assert parsed.model_uris == ["models:/dspy-qa@champion"] and parsed.reload_interval > 0
    known = {env_name(flag) for setting in SETTINGS for flag in setting.flags[-1:]} | {"GATEWAY_API_KEYS",
                                                                                       "MLFLOW_DSPY_FEEDBACK_SECRET"}
    ours = {item["name"] for item in container["env"] if item["name"].startswith(("MLFLOW_DSPY_", "GATEWAY_"))}
    assert ours <= known, ours - known
    env = {item["name"]: item.get("valueFrom", {}) for item in container["env"]}
    # Replicas take each other's feedback: one secret, from the Secret, never optional.
    secret = env["MLFLOW_DSPY_FEEDBACK_SECRET"]["secretKeyRef"]
    assert secret["name"] == "dspy-gateway" and not secret.get("optional")
    # The tracking server it reads models from and writes traces to is the Service of tracking-server.yaml.
    service = manifest("Service", "mlflow")
    [port] = service["spec"]["ports"]
    uri = manifest("ConfigMap", "dspy-gateway")["data"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:" \
                  f"{port['port']}"


def test_the_tracking_server_is_mlflow_server_on_postgresql_serving_the_artifacts():
    from mlflow.cli import server

    deployment = manifest("Deployment", "mlflow")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    args = _expand(container["args"], container)
    server.make_context("server", list(args))  # click refuses an unknown option or a bad value
    known = {opt for param in server.params for opt in param.opts + param.secondary_opts}
    assert _flags(args) <= known, _flags(args) - known
    assert {"--backend-store-uri", "--serve-artifacts", "--artifacts-destination"} <= _flags(args)
    # The database URL (with its password) from a Secret, never in the manifest.
    store = args[args.index("--backend-store-uri") + 1]
    assert store.startswith("mlflow-dspy+postgresql")  # the trace store plugin, on PostgreSQL
    env = {item["name"]: item.get("valueFrom", {}) for item in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["secretKeyRef"]["name"] == "mlflow-tracking"
    config = manifest("ConfigMap", "mlflow-tracking")["data"]
    assert config["MLFLOW_DISABLE_TELEMETRY"] == "true" and config["LITELLM_LOCAL_MODEL_COST_MAP"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    service = manifest("Service", "mlflow")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    [port] = container["ports"]
    assert args[args.index("--port") + 1] == str(port["containerPort"])


def test_the_one_machine_stack_runs_the_manifests_commands(tmp_path):
    """scripts/stack.py (`make stack`) and deploy/k8s: the same commands, the same flags that make the topology."""
    from scripts.stack import Stack

    stack = Stack(tmp_path)
    [gateway] = manifest("Deployment", "dspy-gateway")["spec"]["template"]["spec"]["containers"]
    [tracking] = manifest("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    local_server = stack.server_args()
    assert Path(local_server[0]).name == "mlflow" and local_server[1] == "server"
    topology = {"--backend-store-uri", "--serve-artifacts", "--artifacts-destination", "--host", "--port",
                "--workers"}
    assert _flags(local_server) & topology == _flags(tracking["args"]) & topology == topology
    local_gateway = stack.gateway_args(0)
    assert local_gateway[1:3] == [str(ROOT / "mlflow_dspy.py"), "gateway"]  # what `mlflow-dspy gateway` runs
    assert _flags(local_gateway) <= _flags(gateway["args"]) | {"--reload-interval"}
    assert "--reload-interval" in _flags(gateway["args"])
    # Both follow the champion alias, and both put a replica in rotation on /ready.
    assert local_gateway[local_gateway.index("-m") + 1] == manifest("ConfigMap", "dspy-gateway")["data"]["MODEL_URI"]
    assert "option httpchk GET /ready" in stack.haproxy_config()
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
