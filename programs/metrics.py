"""Metrics shared by the programs: forgiving about case, punctuation and articles."""

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
