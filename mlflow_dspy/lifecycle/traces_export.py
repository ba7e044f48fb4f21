"""`mlflow-dspy traces export`: the gateway's rated traces as examples for the next version.

Each example is one JSON line in the format `--dev` and `--train` read
(program/datasets.py): the program's inputs, from the trace's root span (the
gateway records the program itself as the root), and its outputs:

- where feedback gave the expected outputs (`expected_outputs`), those;
- otherwise, for an answer rated positively (`user_feedback` true or above 0),
  the program's own outputs;
- otherwise none: an answer rated negatively with no correction is no example.

`--feedback` keeps the traces rated that way: `positive`, `negative`,
`expected` (with expected outputs) or `any` rating (the default). A `dspy.History`
input is written as the `{"role", "content"}` messages the data files use.
One example is written per input: where an input was rated more than once,
expected outputs win over an answer rated up (and a held-out example can
never have its twin in the train set).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow_dspy.runtime.trace_record import EXPECTATION_NAME, FEEDBACK_NAME

FEEDBACK_KINDS = ("positive", "negative", "expected", "any")
MAX_TRACES = 100_000  # read at most, newest first
log = logging.getLogger("mlflow_dspy.lifecycle")


@dataclass
class ExportReport:
    out: Path
    traces: int = 0  # traces of the model read
    rated: int = 0  # of them, rated as --feedback asks
    written: int = 0  # examples written
    duplicates: int = 0
    without_outputs: int = 0  # rated negatively with no expected outputs
    trace_ids: list[str] = field(default_factory=list)  # the traces the written examples came from

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "traces": self.traces, "rated": self.rated, "written": self.written,
                "duplicates": self.duplicates, "without_outputs": self.without_outputs}


def parse_since(text: str | None) -> int | None:
    """An ISO date or time (UTC unless it says otherwise) as epoch milliseconds."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is not a date or time (like 2026-11-25 or 2026-11-25T14:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def export_traces(name: str, out: Path, version: str | None = None, since: str | None = None,
                  feedback: str = "any", progress: bool = True) -> ExportReport:
    """Write the examples of NAME's rated traces (of one version, since a time) to `out`."""
    import mlflow
    from tqdm import tqdm

    from mlflow_dspy.packaging.log import EXPERIMENT_NAME, use_tracking_store

    if feedback not in FEEDBACK_KINDS:
        raise ValueError(f"--feedback is one of {', '.join(FEEDBACK_KINDS)}, not {feedback!r}")
    after = parse_since(since)
    use_tracking_store()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    quoted = name.replace("'", "\\'")
    filters = [f"tags.`mlflow_dspy.version` = '{quoted}/{version}'" if version
               else f"tags.`mlflow_dspy.model` LIKE '{quoted}%'",  # NAME, NAME@ALIAS, NAME/VERSION (and more)
               f"trace.timestamp_ms >= {after}" if after is not None else None]
    traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list",
                                  filter_string=" AND ".join(f for f in filters if f), max_results=MAX_TRACES)
    if len(traces) >= MAX_TRACES:
        log.warning("traces export: read the newest %d traces only; narrow it with --since or --version", MAX_TRACES)
    report, seen, rows = ExportReport(out), {}, []
    for trace in tqdm(traces, desc=f"traces of {name}", unit="trace", disable=not progress):
        if not _of_model(trace.info.tags, name):
            continue
        report.traces += 1
        verdict, expected = _ratings(trace.info.assessments)
        if not _wanted(feedback, verdict, expected):
            continue
        report.rated += 1
        root = next((span for span in trace.data.spans if span.parent_id is None), None)
        if root is None or not isinstance(root.inputs, dict):
            continue
        outputs = expected if isinstance(expected, dict) else (_outputs(root.outputs) if _positive(verdict) else None)
        if not outputs:
            report.without_outputs += 1
            continue
        inputs = {key: _data_value(value) for key, value in root.inputs.items()}
        # One example per input: a held-out example must never have its twin in the train set. Where the
        # same input was rated more than once, expected outputs (a correction) win over an answer rated up.
        key = json.dumps(inputs, sort_keys=True, default=str)
        if key in seen:
            report.duplicates += 1
            index, corrected = seen[key]
            if isinstance(expected, dict) and not corrected:
                rows[index], report.trace_ids[index] = {**inputs, **outputs}, trace.info.trace_id
                seen[key] = (index, True)
            continue
        seen[key] = (len(rows), isinstance(expected, dict))
        rows.append({**inputs, **outputs})
        report.trace_ids.append(trace.info.trace_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows), encoding="utf-8")
    report.written = len(rows)
    return report


def _of_model(tags: dict[str, str], name: str) -> bool:
    """A trace of registered model NAME (its version tag is NAME/VERSION), or served as NAME (a program
    served from its code), NAME@ALIAS or NAME/VERSION."""
    served = tags.get("mlflow_dspy.model", "")
    return (tags.get("mlflow_dspy.version", "").startswith(f"{name}/") or served == name
            or served.startswith((f"{name}@", f"{name}/")))


def _ratings(assessments: list) -> tuple[Any, Any]:
    """The latest user verdict and expected outputs recorded on a trace (None where there are none)."""
    verdict = expected = None
    for assessment in sorted(assessments or [], key=lambda a: a.create_time_ms or 0):
        if assessment.name == FEEDBACK_NAME:
            verdict = assessment.value
        elif assessment.name == EXPECTATION_NAME:
            expected = assessment.value
    return verdict, expected


def _positive(verdict: Any) -> bool:
    return verdict is True or (isinstance(verdict, (int, float)) and not isinstance(verdict, bool) and verdict > 0)


def _negative(verdict: Any) -> bool:
    return verdict is False or (isinstance(verdict, (int, float)) and not isinstance(verdict, bool) and verdict <= 0)


def _wanted(kind: str, verdict: Any, expected: Any) -> bool:
    if kind == "positive":
        return _positive(verdict)
    if kind == "negative":
        return _negative(verdict)
    if kind == "expected":
        return expected is not None
    return verdict is not None or expected is not None


def _outputs(value: Any) -> dict | None:
    """The program's own outputs (reasoning is how it got there, not an output to learn)."""
    if not isinstance(value, dict):
        return None
    return {key: item for key, item in value.items() if key != "reasoning"} or None


def _data_value(value: Any) -> Any:
    """An input as the data files write it: a recorded dspy.History ({"messages": [{field: text}, ...]}) as
    the user and assistant messages of its turns (the first field of a turn is the user's, the last the answer)."""
    if isinstance(value, dict) and set(value) == {"messages"} and isinstance(value["messages"], list):
        messages = []
        for turn in value["messages"]:
            if isinstance(turn, dict) and len(turn) >= 2:
                keys = list(turn)
                messages.append({"role": "user", "content": str(turn[keys[0]])})
                messages.append({"role": "assistant", "content": str(turn[keys[-1]])})
        return messages
    return value
