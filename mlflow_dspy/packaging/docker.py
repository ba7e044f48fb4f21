"""Container images: MLflow's Dockerfile for a logged model, made buildable here.

`mlflow models generate-dockerfile` writes a Dockerfile whose dependency step
pip-installs the model's pins, llama-cpp-python included, on python:slim: no
compiler, no CMake, and a native build would pick CPU paths that crash. The
patch adds the toolchain and CMAKE_ARGS before that step.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DEPS_STEP = "_install_pyfunc_deps"
LLAMA_BUILD = (
    "# llama-cpp-python builds from source: a compiler, CMake, and no native CPU flags\n"
    "# (a native build picks AVX-512/AMX paths that segfault on machines without them).\n"
    "RUN apt-get install -y --no-install-recommends build-essential cmake\n"
    'ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"\n'
    "ENV LITELLM_LOCAL_MODEL_COST_MAP=true\n"
)


def patch_dockerfile(text: str) -> str:
    lines = text.splitlines(keepends=True)
    index = next((i for i, line in enumerate(lines) if DEPS_STEP in line), None)
    if index is None:
        raise ValueError("the generated Dockerfile has no dependency step to patch")
    return "".join(lines[:index]) + LLAMA_BUILD + "".join(lines[index:])


def generate_model_dockerfile(model_uri: str, out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    # Run where the user runs us (the tracking store may be a relative sqlite:///
    # path), never in the installed package's directory.
    subprocess.run([mlflow_cli, "models", "generate-dockerfile", "-m", model_uri, "-d", str(out_dir)], check=True,
                   stdout=subprocess.DEVNULL)
    dockerfile = out_dir / "Dockerfile"
    dockerfile.write_text(patch_dockerfile(dockerfile.read_text()))
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
