"""Metrics: the default (every output field matches) and one forgiving about case, punctuation and articles."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: object) -> str:
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(example, prediction, trace=None) -> bool:
    """The gold answer appears in the predicted answer."""
    gold = normalize(example.answer)
    return bool(gold) and gold in normalize(getattr(prediction, "answer", ""))


def _same(gold: object, predicted: object) -> bool:
    if isinstance(gold, str):
        return isinstance(predicted, str) and gold.strip().casefold() == predicted.strip().casefold()
    return gold == predicted


def fields_match(example, prediction, trace=None) -> float | bool:
    """The default metric: the share of the example's output fields the prediction matches
    (strings trimmed and case-folded, other values equal). While optimizing (`trace`
    set), a demo counts only if every field matches."""
    labels = example.labels()
    names = list(labels.keys())
    if not names:
        return 0.0
    matched = sum(_same(labels[name], getattr(prediction, name, None)) for name in names)
    return matched == len(names) if trace is not None else matched / len(names)


DEFAULT_METRIC = "fields_match (every output field, strings trimmed and case-folded)"
