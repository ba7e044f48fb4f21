"""Container images: MLflow's Dockerfile for a logged model, made buildable here, its pins hash-checked.

`mlflow models generate-dockerfile` writes a Dockerfile whose dependency step
pip-installs the model's pins, llama-cpp-python included, on python:slim: no
compiler, no CMake, and a native build would pick CPU paths that crash. The
patch adds the toolchain and CMAKE_ARGS before that step.

It also makes the image's packages the lock's bytes. MLflow's template first
installs `mlflow==X` unchecked, and its dependency step puts the build tools
of python_env.yaml (pip, setuptools, wheel) on the same pip command line as
the model's requirements.txt: with hashes in that file, pip refuses any of
them it would have to fetch. So the patch drops the unchecked mlflow install
(the model's pins hold mlflow), installs the model's pins with
`--require-hashes`, then those build tools in a step of their own (unchecked:
MLflow names them, the lock does not hold pip or wheel); MLflow's step then
finds every package in place (pip trusts what is installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DEPS_STEP = "_install_pyfunc_deps"
MLFLOW_INSTALL = re.compile(r"^(# Install MLflow\n)?RUN pip install mlflow==\S+\n", flags=re.M)
LLAMA_BUILD = (
    "# llama-cpp-python builds from source: a compiler, CMake, and no native CPU flags\n"
    "# (a native build picks AVX-512/AMX paths that segfault on machines without them).\n"
    "RUN apt-get install -y --no-install-recommends build-essential cmake\n"
    'ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"\n'
    "ENV LITELLM_LOCAL_MODEL_COST_MAP=true\n"
)


def patch_dockerfile(text: str, build_tools: list[str] | None = None, hashed: bool = False) -> str:
    """The generated Dockerfile with the llama-cpp-python toolchain before its dependency step and, given
    the model's build tools (python_env.yaml) and whether its requirements.txt carries hashes, its pins
    installed first in steps of their own (hash-checked when they can be) and MLflow's own unchecked
    `pip install mlflow==X` dropped."""
    lines = text.splitlines(keepends=True)
    index = next((i for i, line in enumerate(lines) if DEPS_STEP in line), None)
    if index is None:
        raise ValueError("the generated Dockerfile has no dependency step to patch")
    model_dir = re.search(r"_install_pyfunc_deps\('([^']+)'", lines[index])
    steps = LLAMA_BUILD
    if build_tools is not None and model_dir is not None:
        steps += ("# The model's pins (mlflow among them)"
                  + (", every file checked against its SHA-256 in requirements.txt" if hashed else "")
                  + ", then MLflow's build tools for it (python_env.yaml)\n")
        requirements = f"{model_dir.group(1)}/requirements.txt"
        if hashed:  # the image's pip (23.2) refuses a hashed lock with extras in it: the lock's pip first
            steps += (f"RUN grep '^pip==' {requirements} > /tmp/pip.lock"
                      " && pip install --require-hashes -r /tmp/pip.lock"
                      f" && pip install --require-hashes -r {requirements}\n")
        else:
            steps += f"RUN pip install -r {requirements}\n"
        if build_tools:
            steps += f"RUN pip install {' '.join(build_tools)}\n"
    patched = "".join(lines[:index]) + steps + "".join(lines[index:])
    if build_tools is not None and model_dir is not None:
        patched = MLFLOW_INSTALL.sub("", patched)  # the model's pins install mlflow (checked) instead
    return patched


def model_install_facts(model: Path) -> tuple[list[str], bool]:
    """A model folder's build tools (python_env.yaml's build_dependencies) and whether its requirements.txt
    puts pip in hash-checking mode (a line with a hash)."""
    env_file = model / "python_env.yaml"
    tools = (yaml.safe_load(env_file.read_text()) or {}).get("build_dependencies") or [] if env_file.is_file() else []
    requirements = model / "requirements.txt"
    hashed = requirements.is_file() and "--hash=" in requirements.read_text()
    return [str(tool) for tool in tools], hashed


def generate_model_dockerfile(model_uri: str, out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    # Run where the user runs us (the tracking store may be a relative sqlite:///
    # path), never in the installed package's directory.
    subprocess.run([mlflow_cli, "models", "generate-dockerfile", "-m", model_uri, "-d", str(out_dir)], check=True,
                   stdout=subprocess.DEVNULL)
    dockerfile = out_dir / "Dockerfile"
    models = [path.parent for path in (out_dir / "model_dir").glob("*/MLmodel")]
    tools, hashed = model_install_facts(models[0]) if len(models) == 1 else (None, False)
    dockerfile.write_text(patch_dockerfile(dockerfile.read_text(), tools, hashed))
    return dockerfile


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def build_image(context: Path, tag: str, dockerfile: Path | None = None) -> None:
    args = ["docker", "build", "-t", tag]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    subprocess.run([*args, str(context)], check=True)
