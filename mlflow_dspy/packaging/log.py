"""Log a program as an MLflow chat model with its own code, register it, and describe the version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dspy
import mlflow
from mlflow import MlflowClient
from mlflow.models import Model
from mlflow.tracing.provider import trace_disabled

from mlflow_dspy.artifact import recipe as recipes
from mlflow_dspy.lm_engine.select import adapter_for, build_lm
from mlflow_dspy.packaging import flavor
from mlflow_dspy.packaging.integrity import DIGEST_TAG, SIGNED_BY_TAG, digest, write_manifest
from mlflow_dspy.packaging.load import FORMAT, FORMAT_KEY
from mlflow_dspy.packaging.paths import EXPERIMENT_NAME, PACKAGE_DIR, artifacts_location, tracking_uri
from mlflow_dspy.packaging.redact import scrub_program, scrub_settings
from mlflow_dspy.packaging.requirements import model_requirements
from mlflow_dspy.packaging.signing import key_id, signing_key_from
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.reference import build_module, resolve_attribute, split_reference
from mlflow_dspy.program.target import Target
from mlflow_dspy.runtime.scoring import SCORE_METRIC, EvalReport, evaluate

MODEL_NAME = "model"  # the tutorial's runs:/<id>/model
# Never copied with a user's package or the runtime: caches, VCS, environments, data.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".git", ".venv", "venv", ".mypy_cache",
                                 ".pytest_cache", ".ruff_cache", "*.egg-info", "mlruns", "mlartifacts", "mlflow.db")

# What a loaded model imports of this package: the chat wrapper and its mapping
# (layer 1), the LM engines (layer 2) and the model's own loader (artifact/: built
# from code and state). Nothing above them travels.
RUNTIME_PARTS = ("__init__.py", "program", "lm_engine", "artifact")
# Set in MLmodel's metadata: the model builds from its code and JSON state (data/program_recipe.json).
PICKLE_FREE_KEY = "pickle_free"


@dataclass
class LoggedModel:
    run_id: str
    model_uri: str
    registered_model: str | None
    version: str | None
    dev_score: float | None = None
    dev_failed: int | None = None  # dev examples whose run failed (each scored 0)

    def as_dict(self) -> dict[str, str | float | None]:
        return asdict(self)


# What this tool writes into a project (its default tracking store): not the user's changes.
TOOL_OUTPUTS = ("mlflow.db", "mlartifacts", "mlruns")


def git_commit(folder: Path) -> str:
    """The commit of the user's project (`-dirty` with uncommitted changes, the tool's own store aside), or
    "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        )
        outside_store = [f":(exclude,glob)**/{name}" for name in TOOL_OUTPUTS] + \
            [f":(exclude,glob)**/{name}/**" for name in TOOL_OUTPUTS]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", *outside_store], cwd=folder, capture_output=True, text=True,
            timeout=10,
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
def staged_code(target: Target) -> Iterator[list[str]]:
    """Copies for `code_paths`: the user's module (its local package, or the single file) and
    this package's runtime, without bytecode, VCS folders, environments or data."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        runtime = Path(tmp) / PACKAGE_DIR.name
        runtime.mkdir()
        for part in RUNTIME_PARTS:
            if (PACKAGE_DIR / part).is_dir():
                shutil.copytree(PACKAGE_DIR / part, runtime / part, ignore=IGNORED)
            else:
                shutil.copy2(PACKAGE_DIR / part, runtime / part)
        paths.append(str(runtime))
        source = target.source.path
        if source is not None:
            copy = Path(tmp) / source.name
            if source.is_dir():
                shutil.copytree(source, copy, ignore=_ignoring_data(target))
            else:
                shutil.copy2(source, copy)
            paths.append(str(copy))
        yield paths


def _ignoring_data(target: Target):
    """IGNORED, plus the program's own train and dev sets when they sit inside its package."""
    data = {p.resolve() for p in (target.config.dev, target.config.train) if p is not None}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(IGNORED(folder, names)) | {n for n in names if (Path(folder) / n).resolve() in data}

    return ignore


def describe(target: Target, lm_model: str, note: str | None = None) -> str:
    what = target.config.description or (target.module.__doc__ or "").strip().split("\n")[0] or "a DSPy program."
    what = what if what.endswith((".", "!", "?")) else f"{what}."
    mapping = target.mapping
    question = mapping.question_field or f"a JSON object of {', '.join(mapping.json_fields)}"
    text = (
        f"DSPy program `{target.name}` ({target.config.reference}): {what} Chat task (llm/v1/chat): the last user "
        f"message fills {question}; answers with {', '.join(mapping.answer_fields)}. "
        f"LM at log time: {lm_model}. Keys are read from the serving environment, never stored."
    )
    return f"{text} {note}" if note else text


def _log_json(name: str, content: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(content, indent=2, default=str))
        mlflow.log_artifact(str(path))


def _log_program_state(module: dspy.Module) -> None:
    """The program's DSPy state (signatures, instructions, demos) as readable JSON beside the model (no LM
    endpoint or key in it: the same state the model loads)."""
    _log_json("program_state.json", recipes.program_state(module))


def _build_reference(target: Target, module: dspy.Module) -> tuple[str | None, Any]:
    """(module:attr in the artifact's code/ that builds `module`'s skeleton, a function that builds it here
    from the user's own code), or (None, None).

    A reference's attribute in the module it names (a file reference's module is the file's stem, which is
    also its name in code/); a program object given in Python, its class, when it is a class of the user's
    own built with no arguments."""
    reference = target.config.reference
    if ":" in reference and not reference.startswith("<"):
        _, attr = split_reference(reference)

        def rebuild() -> dspy.Module:
            return build_module(resolve_attribute(reference, target.config.base_dir).value, reference)

        return f"{target.source.module}:{attr}", rebuild
    cls = type(module)
    if cls.__module__ in ("__main__", "builtins") or cls.__module__.split(".")[0] == "dspy":
        return None, None
    return recipes.class_path(cls), lambda: build_module(cls, recipes.class_path(cls))


def _pickle_free(target: Target, module: dspy.Module, chat: ChatProgram, lm: dspy.BaseLM,
                 adapter: Any) -> recipes.Planned | None:
    """What serves the program without its pickle, checked by building it once; None (and a note) when the
    program cannot be built again from its code."""
    build, rebuild = _build_reference(target, module)
    config = target.config
    planned, why = recipes.plan(chat.program, build, rebuild, target.mapping,
                                    (config.question_field, config.context_field, config.answer_field), lm, adapter)
    if planned is None:
        print(f"note: {target.name} is logged with its pickle alone, and every server of it will unpickle it "
              f"(running whatever code the pickle names): {why}", file=sys.stderr)
    return planned


@dataclass
class _Plan:
    """What a log writes, all of it worked out (and the user's input checked) before any MLflow run exists."""

    chat: ChatProgram  # scrubbed: no credentials
    lm: dspy.BaseLM
    adapter: Any
    registered_model_name: str
    requirements: list[str]
    example: str
    report: EvalReport | None
    description: str
    tags: dict[str, str]
    params: dict[str, str]
    metadata: dict[str, Any]
    pickle_free: recipes.Planned | None  # what builds it from code and state; None: its pickle alone
    signing_key: Any = None  # an Ed25519 private key: the manifest is signed with it


def log_target(
    target: Target,
    lm: dspy.BaseLM | None = None,
    registered_model_name: str | None = None,
    module: dspy.Module | None = None,
    evaluate_dev: bool = True,
    extra_tags: dict[str, str] | None = None,
    extra_metrics: dict[str, float] | None = None,
    note: str | None = None,
    signing_key: str | Path | None = None,
) -> LoggedModel:
    """Log `target`'s program wrapped for chat, with its code and pins, and register it.

    `module` is the program to log (a compiled one, say); by default the
    target's own. `lm` defaults to the configured DSPy LM, else the target's,
    else the one `DSPY_LM` names, else the embedded model; a copy of it without
    credentials is what gets pickled. With a dev set (and `evaluate_dev`), the
    program is scored first, and the score travels with the run and the version.
    Everything that can fail on the user's input (data rows, metric, pins, the
    signing key) is checked before any MLflow run is created. The model gets a
    manifest of its files, signed with `signing_key` (a PEM file; default
    $MLFLOW_DSPY_SIGNING_KEY; none: unsigned): packaging/integrity.py.
    """
    key = signing_key_from(signing_key)
    plan = _plan(target, lm, registered_model_name, module, evaluate_dev, extra_tags, note)
    plan.signing_key = key
    if key is not None:
        plan.tags[SIGNED_BY_TAG] = key_id(key.public_key())
    run_id, info = _log_run(target, plan, extra_metrics)
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    if version is not None:
        client = MlflowClient()
        client.update_model_version(plan.registered_model_name, version, description=plan.description)
        for key, value in plan.tags.items():
            client.set_model_version_tag(plan.registered_model_name, version, key, value)
    return LoggedModel(
        run_id=run_id,
        model_uri=f"runs:/{run_id}/{MODEL_NAME}",
        registered_model=plan.registered_model_name if version is not None else None,
        version=version,
        dev_score=plan.report.score if plan.report else None,
        dev_failed=plan.report.failed if plan.report else None,
    )


def _plan(target: Target, lm: dspy.BaseLM | None, registered_model_name: str | None, module: dspy.Module | None,
          evaluate_dev: bool, extra_tags: dict[str, str] | None, note: str | None) -> _Plan:
    """Everything a log writes; the user's input (data rows, metric, pins) checked, the dev set scored."""
    lm = lm or dspy.settings.lm or build_lm(target.config.lm)
    adapter = dspy.settings.adapter or adapter_for(lm)
    lm_model = getattr(lm, "model", type(lm).__name__)
    registered_model_name = registered_model_name or target.config.model_name
    module = module or target.module
    requirements = model_requirements(target.config.requirements)
    metric, metric_name = target.metric()
    dev = target.examples("dev") if evaluate_dev and target.config.dev is not None else None
    example = target.input_example()
    if target.mapping.history_field is None:
        how = (f"folded into its '{target.mapping.question_field}' text" if target.mapping.question_field else
               "refused with a 400 (its user message is a JSON object of its inputs)")
        print(f"note: {target.name} has no dspy.History input: in a chat, earlier turns are {how}; give it a "
              "dspy.History input to see them as a history", file=sys.stderr)
    report = evaluate(target.name, module, dev, metric, lm, adapter, target.data_hash()) if dev else None
    tags = {
        "program": target.name,
        "reference": target.config.reference,
        "lm": lm_model,
        "git_commit": git_commit(target.config.base_dir),
        "dspy_version": dspy.__version__,
        "mlflow_version": mlflow.__version__,
        "metric": metric_name,
        "dataset_hash": target.data_hash(),
        SCORE_METRIC: f"{report.score:.2f}" if report else "not evaluated",
        **(extra_tags or {}),
    }
    chat = scrub_program(target.chat(module))
    planned = _pickle_free(target, module, chat, lm, adapter)
    return _Plan(
        chat=chat, lm=lm, adapter=adapter,
        registered_model_name=registered_model_name, requirements=requirements, example=example, report=report,
        description=describe(target, lm_model, note), tags=tags,
        params={"program": target.name, "lm": lm_model, "metric": metric_name},
        metadata={"program": target.name, "lm": lm_model, "registered_model": registered_model_name,
                  FORMAT_KEY: FORMAT, "chat_mapping": target.mapping.describe(),
                  PICKLE_FREE_KEY: planned is not None},
        pickle_free=planned)


@trace_disabled  # as mlflow.dspy.log_model: MLflow's check of the input example runs the program once
def _log_model(plan: _Plan, code_paths: list[str]) -> Any:
    """`mlflow.dspy.log_model(plan.chat, task="llm/v1/chat", ...)`, which is `Model.log(flavor=mlflow.dspy, ...)`,
    with packaging/flavor.py as the flavor module: MLflow's DSPy flavor as it is, plus the program's recipe,
    its JSON state and the pickle-free `python_function` loader."""
    return Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=flavor,
        flavor_name="mlflow.dspy",
        model=plan.chat,
        task="llm/v1/chat",
        input_example={"messages": [{"role": "user", "content": plan.example}]},
        code_paths=code_paths,
        pip_requirements=plan.requirements,
        registered_model_name=plan.registered_model_name,
        metadata=plan.metadata,
        pickle_free=plan.pickle_free,
    )


def _log_run(target: Target, plan: _Plan, extra_metrics: dict[str, float] | None) -> tuple[str, Any]:
    """The MLflow run: tags, params, the dev table, the program's state, the model (registered) and its copy
    under the run's artifacts, and its digest. Its id and the logged model's info."""
    use_tracking_store()
    with mlflow.start_run(run_name=target.name, description=plan.description) as run:
        mlflow.set_tags(plan.tags)
        mlflow.log_params(plan.params)
        if extra_metrics:
            mlflow.log_metrics(extra_metrics)
        if plan.report:
            mlflow.log_metric(SCORE_METRIC, plan.report.score)
            mlflow.log_table(plan.report.table(), artifact_file="eval/dev_results.json")
        _log_program_state(plan.chat.program)
        _log_json("chat_mapping.json", target.mapping.describe())
        with staged_code(target) as code_paths, dspy.context(**scrub_settings(plan.lm, plan.adapter)):
            info = _log_model(plan, code_paths)
        with tempfile.TemporaryDirectory() as tmp:
            # The manifest of every file the flavor wrote (and its signature), beside them in the logged
            # model; checked before anything of it is loaded (packaging/integrity.py).
            local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp)
            # What a models:/ download adds (the registered name, plain YAML): not one of the model's files.
            Path(local, "registered_model_meta").unlink(missing_ok=True)
            for written in write_manifest(local, plan.signing_key):
                MlflowClient().log_model_artifact(info.model_id, str(written))
            # MLflow 3 keeps a logged model apart from its run; a copy under the
            # run's own artifacts puts MLmodel, the pins, the recipe and state where the
            # tutorial shows them: the run's Artifacts tab.
            mlflow.log_artifacts(local, artifact_path=MODEL_NAME)
            plan.tags[DIGEST_TAG] = digest(local)
        mlflow.set_tag(DIGEST_TAG, plan.tags[DIGEST_TAG])
        if SIGNED_BY_TAG in plan.tags:
            mlflow.set_tag(SIGNED_BY_TAG, plan.tags[SIGNED_BY_TAG])
        mlflow.set_logged_model_tags(info.model_id, {key: plan.tags[key] for key in (DIGEST_TAG, SIGNED_BY_TAG)
                                                     if key in plan.tags})
    return run.info.run_id, info
