"""Log a chat program as an MLflow model, register it, and describe the version."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import dspy
import mlflow
from mlflow import MlflowClient

from lm_engine.select import adapter_for, build_lm
from packager.integrity import DIGEST_TAG, digest
from packager.paths import CODE_PACKAGES, EXPERIMENT_NAME, PROJECT_ROOT, artifacts_location, tracking_uri
from packager.redact import scrub_program, scrub_settings
from packager.requirements import pinned_requirements
from programs import program_spec, wrap_for_chat
from programs.datasets import dataset_hash

MODEL_NAME = "model"  # the tutorial's runs:/<id>/model


@dataclass
class LoggedModel:
    run_id: str
    model_uri: str
    registered_model: str | None
    version: str | None
    dev_score: float | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def use_tracking_store() -> str:
    """Point MLflow at the tracking store and the project's experiment.

    The local default keeps artifacts in ./mlartifacts next to ./mlflow.db,
    which is the pair `make ui` serves.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # log_model makes its model the process's "active model", and later
    # metrics of any run would be attached to it (even across stores).
    mlflow.clear_active_model()
    if mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None:
        mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifacts_location(uri))
    mlflow.set_experiment(EXPERIMENT_NAME)
    return uri


@contextmanager
def staged_code() -> Iterator[list[str]]:
    """Copies of the code packages without bytecode caches, for `code_paths`."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for package in CODE_PACKAGES:
            target = Path(tmp) / package
            shutil.copytree(PROJECT_ROOT / package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            paths.append(str(target))
        yield paths


def describe(program: str, lm_model: str, note: str | None = None) -> str:
    spec = program_spec(program)
    text = (
        f"DSPy program `{program}`: {spec.DESCRIPTION} Chat task (llm/v1/chat): the last user message is the "
        f"question; earlier turns are history for programs that take one; system messages become instructions. "
        f"LM at log time: {lm_model}. Keys are read from the serving environment, never stored."
    )
    return f"{text} {note}" if note else text


def _log_program_state(module: dspy.Module) -> None:
    """The program's DSPy state (signatures, instructions, demos) as readable JSON beside the model."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program_state.json"
        module.save(str(path))
        mlflow.log_artifact(str(path))


def log_program(
    program: str,
    lm: dspy.BaseLM | None = None,
    registered_model_name: str | None = None,
    module: dspy.Module | None = None,
    evaluate_dev: bool = True,
    extra_tags: dict[str, str] | None = None,
    extra_metrics: dict[str, float] | None = None,
    note: str | None = None,
) -> LoggedModel:
    """Log `program` wrapped for chat, with the project's code and pins, and register it.

    `module` is the program to log (a compiled one, say); by default the
    registry builds it. `lm` defaults to the configured DSPy LM, else the one
    `DSPY_LM` names, else the embedded model; a copy of it without credentials
    is what gets pickled. Unless `evaluate_dev` is off, the program is scored on
    its dev set first, and the score travels with the run and the version.
    """
    from lifecycle.evaluate import SCORE_METRIC, evaluate

    spec = program_spec(program)
    lm = lm or dspy.settings.lm or build_lm()
    adapter = dspy.settings.adapter or adapter_for(lm)
    lm_model = getattr(lm, "model", type(lm).__name__)
    registered_model_name = registered_model_name or f"dspy-{program}"
    module = module or spec.build()
    report = evaluate(program, module, lm, adapter) if evaluate_dev else None
    chat = scrub_program(wrap_for_chat(program, module))  # what is pickled and saved: no credentials
    description = describe(program, lm_model, note)
    tags = {
        "program": program,
        "lm": lm_model,
        "git_commit": git_commit(),
        "dspy_version": dspy.__version__,
        "mlflow_version": mlflow.__version__,
        "dataset_hash": dataset_hash(program),
        SCORE_METRIC: f"{report.score:.2f}" if report else "not evaluated",
        **(extra_tags or {}),
    }

    use_tracking_store()
    with mlflow.start_run(run_name=f"{program}", description=description) as run:
        mlflow.set_tags(tags)
        mlflow.log_params({"program": program, "lm": lm_model})
        if extra_metrics:
            mlflow.log_metrics(extra_metrics)
        if report:
            mlflow.log_metric(SCORE_METRIC, report.score)
            mlflow.log_table(report.table(), artifact_file="eval/dev_results.json")
        _log_program_state(chat.program)
        with staged_code() as code_paths, dspy.context(**scrub_settings(lm, adapter)):
            info = mlflow.dspy.log_model(
                chat,
                name=MODEL_NAME,
                task="llm/v1/chat",
                input_example={"messages": [{"role": "user", "content": spec.EXAMPLE_QUESTION}]},
                code_paths=code_paths,
                pip_requirements=pinned_requirements(),
                registered_model_name=registered_model_name,
                metadata={"program": program, "lm": lm_model},
            )
        # MLflow 3 keeps a logged model apart from its run; a copy under the
        # run's own artifacts puts MLmodel, the pins and the pickle where the
        # tutorial shows them: the run's Artifacts tab.
        local = mlflow.artifacts.download_artifacts(info.model_uri)
        mlflow.log_artifacts(local, artifact_path=MODEL_NAME)
        # Checked before every unpickling (packager/integrity.py).
        tags[DIGEST_TAG] = digest(local)
        mlflow.set_tag(DIGEST_TAG, tags[DIGEST_TAG])
        mlflow.set_logged_model_tags(info.model_id, {DIGEST_TAG: tags[DIGEST_TAG]})
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    if version is not None:
        client = MlflowClient()
        client.update_model_version(registered_model_name, version, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, version, key, value)
    return LoggedModel(
        run_id=run.info.run_id,
        model_uri=f"runs:/{run.info.run_id}/{MODEL_NAME}",
        registered_model=registered_model_name if version is not None else None,
        version=version,
        dev_score=report.score if report else None,
    )
