"""Read and write batch files: parquet, csv or jsonl, chosen by extension."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

FORMATS = (".parquet", ".csv", ".jsonl")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path.name}: use one of {', '.join(FORMATS)}")
    return suffix


def read_table(path: Path) -> pd.DataFrame:
    kind = _format(path)
    if kind == ".parquet":
        return pd.read_parquet(path)
    if kind == ".csv":
        return pd.read_csv(path, keep_default_na=False)
    return pd.read_json(path, lines=True, dtype=False)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    kind = _format(path)
    tmp = path.with_name(path.name + ".tmp")
    if kind == ".parquet":
        frame.to_parquet(tmp, index=False)
    elif kind == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(path)  # all or nothing: a reader never sees half a file


def messages_of(row: dict) -> list[dict]:
    """A row's conversation: its `messages` (a list, or JSON text of one) or its `question`."""
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if isinstance(messages, str):
            messages = json.loads(messages)
        if hasattr(messages, "tolist"):
            messages = messages.tolist()
        return [dict(m) for m in messages]
    if "question" in row:
        return [{"role": "user", "content": str(row["question"])}]
    raise ValueError("each row needs a 'messages' or a 'question' column")


def plain(value):
    """Numpy arrays and scalars (as parquet hands them back) as plain Python, for JSON."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
