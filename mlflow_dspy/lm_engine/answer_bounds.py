"""What bounds an embedded answer as it is generated (the scheduler applies them, token by token).

- The repetition guard (`Repetition`): generation is looping when its last tokens are one span written
  several times in a row, or alike but for their numbers: a count (`RepetitionLimit`). Measured on
  SmolLM2-135M's real answers, generated without the guard (68 of the example and tutorial programs, 12
  free-text ones): the default limit caught the 9 that repeated one span to the end (spans of 2 to 63
  tokens, caught after 33 to 394 tokens) and the 2 that counted on to their limit (a numbered list of the
  same item, a Python list counting to 82), and none of the 69 others, rambling ones and a count from 1
  to 60 that was asked for included.
- The JSON level (`JsonLevel`): how deep the answer written so far is, so that a loop can be closed where
  it is, and an answer near its budget closed as a whole (`Closing`).
- The closing plan (`ClosingPlan`): what closing a JSON answer may still have to write, so that closing
  starts while the budget still holds it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionLimit:
    """When generation is looping: the last tokens are one span of at most `max_period` tokens, written
    `repeats` times in a row and at least `min_tokens` tokens in all (a short span must repeat more); or the
    same with only its numbers changing ("1, 2, 3, ...", "4. Chili de la Noche: ...", "5. Chili de la
    Noche: ..."), at least `min_tokens_counting` tokens in all."""

    max_period: int = 64
    repeats: int = 3
    min_tokens: int = 32
    min_tokens_counting: int = 96


CLOSING_LIMIT = 32  # tokens a looping JSON answer may take to finish its item before it is closed at once


@dataclass
class Closing:
    """A JSON answer being closed: down to below `below` (1: the whole answer), the model first finishing the
    item or member it is in (`finish_item`, after a loop) or not (near the token budget)."""

    below: int
    finish_item: bool
    tokens: int = 0


class _Runs:
    """For each period p, how many of the latest items equal the item p before them (a run of r such items
    means the last r + p items repeat a span of p)."""

    def __init__(self, max_period: int, repeats: int, min_items: int) -> None:
        self.max_period, self.repeats, self.min_items = max_period, repeats, min_items
        self._items: list[int] = []
        self._runs = [0] * (max_period + 1)

    def add(self, item: int) -> int:
        """Take the next item; the period of the repetition it completes, else 0."""
        items, runs = self._items, self._runs
        items.append(item)
        last = len(items) - 1
        found = 0
        for period in range(1, min(self.max_period, last) + 1):
            runs[period] = runs[period] + 1 if items[last - period] == item else 0
            if not found and runs[period] + period >= max(self.repeats * period, self.min_items):
                found = period
        return found

    def reset(self) -> None:
        self._runs = [0] * (self.max_period + 1)


class Repetition:
    """The repetition guard of one sequence, over its tokens and over their shapes (a token's text with each
    run of digits as one mark: the tokens of a count are alike)."""

    def __init__(self, limit: RepetitionLimit) -> None:
        self.limit = limit
        self._tokens = _Runs(limit.max_period, limit.repeats, limit.min_tokens)
        self._shapes = _Runs(limit.max_period, limit.repeats, limit.min_tokens_counting)

    def add(self, token: int, shape: int | None = None) -> int:
        """Take the next token (and its shape's id, if known); the period of the loop it completes, else 0."""
        found = self._tokens.add(token)
        counting = self._shapes.add(token if shape is None else shape)
        return found or counting

    def reset(self) -> None:
        self._tokens.reset()
        self._shapes.reset()


class JsonLevel:
    """How deep the JSON written so far is: open objects and lists, plus one inside a string (read from the
    bytes: the characters that matter are ASCII, which no other UTF-8 character's bytes contain)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self._escaped = False

    @property
    def level(self) -> int:
        return self.depth + self.in_string

    def overruns(self, piece: bytes, below: int) -> bool:
        """Whether `piece` would come down to `below` and then write on (a comma, a new string) instead of
        ending there, or closing more."""
        probe = JsonLevel()
        probe.depth, probe.in_string, probe._escaped = self.depth, self.in_string, self._escaped
        reached = False
        for byte in piece:
            if reached and byte not in b" ]}":
                return True
            probe.feed(bytes((byte,)))
            reached = reached or probe.level <= below
        return False

    def feed(self, piece: bytes) -> int:
        """Read a token's bytes; the lowest level reached while reading them."""
        low = self.level
        for byte in piece:
            if self.in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in (0x7B, 0x5B):  # { [
                self.depth += 1
            elif byte in (0x7D, 0x5D):  # } ]
                self.depth -= 1
            low = min(low, self.level)
        return low


@dataclass(frozen=True)
class ClosingPlan:
    """What closing a JSON answer may still have to write, in tokens: its top-level fields in order, each as
    (its name, the tokens of `"name": `, the tokens of its shortest value and a comma), and a margin (the
    closing brackets of what is open, tokens cut differently than counted)."""

    fields: tuple[tuple[str, int, int], ...]
    margin: int

    @property
    def reserve(self) -> int:
        """From the start of the answer."""
        return self.margin + 1 + sum(key + value for _, key, value in self.fields)

    def room(self, text: str) -> int:
        """From the end of `text`, the answer so far: the value of the last field it has begun, and the
        fields after it."""
        begun = [i for i, (name, _, _) in enumerate(self.fields) if f'"{name}"' in text]
        if not begun:
            return self.reserve
        last = max(begun)
        return self.margin + self.fields[last][2] + sum(key + value for _, key, value in self.fields[last + 1:])
