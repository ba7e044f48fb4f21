"""Follow output fields as an LM writes them, for token-by-token streaming.

DSPy 3.4.1's `StreamListener` hands JSONAdapter output through as raw JSON
(quotes, separators and the next key leak into the chunks), so the gateway
reads the raw LM chunks from `dspy.streamify` and decodes them itself. One
`FieldStream` is built per request: it keeps state.

- JSON output (`{"reasoning": "...", "answer": "..."}`): parsed partially with
  jiter after every chunk; a string value that grew yields the new text.
- ChatAdapter output (`[[ ## answer ## ]]\\n...`): the text after a field's
  marker, holding back what could be the start of the next marker.
"""

from __future__ import annotations

import re

import jiter

MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")


def _json_values(text: str) -> dict[str, str]:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        parsed = jiter.from_json(text[start:].encode(), partial_mode="trailing-strings")
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {k: v for k, v in parsed.items() if isinstance(v, str)}


# The start of a "[[ ## field ## ]]" marker, cut anywhere, at the very end of the text.
PARTIAL_MARKER = re.compile(r"\[(?:\[(?: (?:#(?:#(?: (?:\w+(?: (?:#(?:#(?: (?:\])?)?)?)?)?)?)?)?)?)?)?$")


def _marker_values(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    matches = list(MARKER.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[match.end() : end]
        if i + 1 == len(matches):
            # The next marker may be arriving: hold back a trailing "[", "[[", "[[ ## na"..., all of it.
            partial = PARTIAL_MARKER.search(value, max(0, len(value) - 60))
            if partial is not None:
                value = value[: partial.start()]
        values[match.group(1)] = value.strip()
    return values


class FieldStream:
    """Turns raw LM text chunks into (field, new text) pairs for the fields asked for."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        self.buffer = ""
        self.sent = dict.fromkeys(fields, "")

    def _values(self) -> dict[str, str]:
        if MARKER.search(self.buffer):
            return _marker_values(self.buffer)
        return _json_values(self.buffer)

    def new_call(self) -> None:
        """Another LM call of the same predictor (a retry, Refine, BestOfN): parse its text afresh.

        What was already sent stays sent; the new call's text streams on only
        where it extends it.
        """
        self.buffer = ""

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        self.buffer += chunk
        values = self._values()
        deltas = []
        for field in self.fields:
            new, old = values.get(field), self.sent[field]
            if new is not None and len(new) > len(old) and new.startswith(old):
                deltas.append((field, new[len(old) :]))
                self.sent[field] = new
        return deltas

    def finish(self, field: str, final: str) -> str:
        """What is left of `field` once the program's final value is known."""
        sent = self.sent.get(field, "")
        if final.startswith(sent) and len(final) > len(sent):
            self.sent[field] = final
            return final[len(sent) :]
        return ""
