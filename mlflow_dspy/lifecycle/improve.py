"""`mlflow-dspy improve NAME --from-traces`: the next version, from what users said about this one.

In order:

1. **export** the rated traces of NAME (`traces export`: inputs, and the
   expected outputs or a rated-up answer's own);
2. **split** them into a train and a held-out set, shuffled with a fixed seed;
3. **optimize** a copy of the champion's program (its instructions and
   structure; the optimizer chooses its demos anew) on the train split, with
   the optimizer `optimize` uses;
4. **score** the champion and the candidate on the same held-out set, with the
   champion's LM and metric;
5. **register** the candidate as a new version, with both scores;
6. **promote** it to the alias only if it wins: its held-out score must exceed
   the champion's by more than `--margin` points (0 to 100; default 0, so any
   strict improvement wins and a tie keeps the champion).

One MLflow run (`improve-NAME`) records the loop: the exported train and
held-out sets as MLflow datasets (`mlflow.log_input`) and files, both scores,
the decision and why. `--dry-run` runs steps 1 to 4 and says what it would do,
changing nothing: no version, no alias, no run.

A gateway that serves `models:/NAME@champion` picks the promoted version up at
its next look at the registry (`--reload-interval`).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import dspy
from mlflow import MlflowClient

from mlflow_dspy.lifecycle.models import load
from mlflow_dspy.lifecycle.optimize import compile_program
from mlflow_dspy.lifecycle.traces_export import export_traces
from mlflow_dspy.packaging.log import log_target, use_tracking_store
from mlflow_dspy.packaging.promote import promote
from mlflow_dspy.packaging.signing import signing_key_from
from mlflow_dspy.program.datasets import DataProblem, load_examples
from mlflow_dspy.program.metrics import DEFAULT_METRIC, fields_match
from mlflow_dspy.program.project import resolve_target
from mlflow_dspy.program.reference import resolve_function
from mlflow_dspy.program.target import open_target
from mlflow_dspy.runtime.scoring import evaluate

MIN_EXAMPLES = 2  # one to learn from, one to judge on


class NothingToImprove(ValueError):
    """Too little rated data to train and judge a candidate."""


@dataclass
class Improvement:
    name: str
    alias: str
    champion_version: str
    examples: int
    train: int
    heldout: int
    champion_score: float
    candidate_score: float
    margin: float
    promote: bool
    why: str
    dry_run: bool
    candidate_version: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def improve(name: str, alias: str = "champion", optimizer: str = "bootstrap", holdout: float = 0.3,
            seed: int = 0, margin: float = 0.0, metric: str | None = None, version: str | None = None,
            since: str | None = None, feedback: str = "any", dry_run: bool = False,
            signing_key: str | None = None) -> Improvement:
    signing_key_from(signing_key)  # a key that cannot be read stops here (the new version is signed as log signs)
    use_tracking_store()
    champion = load(f"models:/{name}@{alias}")
    champion_tags = MlflowClient().get_model_version(name, champion.version).tags
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_traces(name, Path(tmp) / "traces.jsonl", version, since, feedback)
        exported.written -= _keep_fitting(exported.out, champion.chat.mapping)
        if exported.written < MIN_EXAMPLES:
            raise NothingToImprove(f"{exported.written} examples from the rated traces of {name} (of "
                                   f"{exported.traces} traces); improve needs at least {MIN_EXAMPLES}: rate more "
                                   "answers (POST /v1/feedback)")
        try:
            examples = load_examples(exported.out, champion.chat.mapping)
        except DataProblem as problem:
            raise NothingToImprove(f"the exported traces do not fit {name}'s fields: {problem}") from None
        train, heldout = split(examples, holdout, seed)
        metric_fn, metric_name = _metric(metric or champion_tags.get("metric"))
        with dspy.context(lm=champion.lm, adapter=champion.adapter):
            candidate = compile_program(optimizer, champion.chat.program.deepcopy(), train, metric_fn)
            champion_score = evaluate(name, champion.chat.program, heldout, metric_fn, champion.lm,
                                      champion.adapter).score
            candidate_score = evaluate(name, candidate, heldout, metric_fn, champion.lm, champion.adapter).score
        wins = candidate_score > champion_score + margin
        why = (f"the candidate scores {candidate_score:.1f} on {len(heldout)} held-out examples against the champion's "
               f"(version {champion.version}) {champion_score:.1f}: "
               + (f"more than {margin:g} points better" if wins else f"not more than {margin:g} points better"))
        result = Improvement(name, alias, str(champion.version), len(examples), len(train), len(heldout),
                             champion_score, candidate_score, margin, wins, why, dry_run)
        if dry_run:
            return result
        target = _program_target(name, champion.version, champion_tags)
        logged = log_target(
            target, lm=champion.lm, registered_model_name=name, module=candidate, evaluate_dev=False,
            extra_tags={"optimizer": optimizer, "improved_from": str(champion.version), "heldout_score":
                        f"{candidate_score:.2f}", "champion_heldout_score": f"{champion_score:.2f}", "metric":
                        metric_name},
            extra_metrics={"heldout_score": candidate_score, "champion_heldout_score": champion_score},
            note=f"Improved from version {champion.version} on {len(train)} examples from rated traces; held-out "
                 f"score {candidate_score:.1f} against the champion's {champion_score:.1f}.",
            signing_key=signing_key,
        )
        result.candidate_version = logged.version
        if wins:
            _tag_score(name, logged.version, candidate_score)
            promote(name, logged.version, alias, force=True, reason=f"improve: {why}")
        result.run_id = _record(result, exported.out, train, heldout, metric_name)
    return result


def _keep_fitting(path: Path, mapping) -> int:
    """Drop the rows that do not fit the champion's fields (traces of an older version with other inputs);
    returns how many were dropped."""
    required = [field.name for field in mapping.inputs if field.required]
    outputs = {field.name for field in mapping.outputs}
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (row := json.loads(line)) and all(name in row for name in required)
            and outputs & set(row)]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(lines) - len(kept)


def split(examples: list[dspy.Example], holdout: float, seed: int) -> tuple[list, list]:
    """Train and held-out sets, shuffled with `seed`: the same data and seed, the same split."""
    if not 0 < holdout < 1:
        raise ValueError(f"--holdout is a fraction between 0 and 1, not {holdout}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    cut = min(len(shuffled) - 1, max(1, round(len(shuffled) * holdout)))
    return shuffled[cut:], shuffled[:cut]


def _metric(name: str | None) -> tuple:
    """The metric named on the command line, else the one the champion was scored with, else fields_match."""
    if not name or name == DEFAULT_METRIC:
        return fields_match, DEFAULT_METRIC
    return resolve_function(name), name


def _program_target(name: str, version: str, tags: dict[str, str]):
    """The program the champion was logged from (its code is logged with the candidate): its reference, as
    recorded, else its program name (a project's program or an example, whose reference is relative)."""
    from mlflow_dspy.program.reference import ReferenceProblem

    problem = None
    for reference in (tags.get("reference"), tags.get("program")):
        if reference:
            try:
                return open_target(resolve_target(reference))
            except (ReferenceProblem, ValueError) as exc:
                problem = exc
    raise NothingToImprove(f"the program version {version} of {name} was logged from cannot be found here"
                           + (f" ({problem})" if problem else ""))


def _tag_score(name: str, version: str, score: float) -> None:
    """The score promote compares: the candidate's held-out score."""
    from mlflow_dspy.runtime.scoring import SCORE_METRIC

    MlflowClient().set_model_version_tag(name, version, SCORE_METRIC, f"{score:.2f}")


def _record(result: Improvement, exported: Path, train: list, heldout: list, metric_name: str) -> str:
    """One run for the loop: its data as MLflow datasets, both scores, the decision and why."""
    import mlflow
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource

    with mlflow.start_run(run_name=f"improve-{result.name}") as run:
        mlflow.set_tags({"kind": "improve", "program": result.name, "decision": "promoted" if result.promote
                         else "kept the champion", "why": result.why, "candidate_version": result.candidate_version
                         or "", "champion_version": result.champion_version})
        mlflow.log_params({"alias": result.alias, "margin": result.margin, "metric": metric_name,
                           "examples": result.examples, "train": result.train, "heldout": result.heldout})
        mlflow.log_metrics({"champion_heldout_score": result.champion_score,
                            "candidate_heldout_score": result.candidate_score})
        for context, rows in (("train", train), ("heldout", heldout)):
            frame = pd.DataFrame([{key: json.dumps(value, default=str) if not isinstance(value, str) else value
                                   for key, value in example.toDict().items()} for example in rows])
            # Where the rows came from: the rated traces, exported into this run's data/traces.jsonl.
            source = CodeDatasetSource({"mlflow_dspy.source": "traces export", "model": result.name,
                                        "file": "data/traces.jsonl"})
            mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=f"{result.name}-{context}"),
                             context=context)
        mlflow.log_artifact(str(exported), artifact_path="data")
    return run.info.run_id
