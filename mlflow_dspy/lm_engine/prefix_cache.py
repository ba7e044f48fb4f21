"""An LRU of saved KV states for prompt prefixes, bounded in bytes.

A prefix is looked up by its exact token sequence: a program whose
instructions changed (a new version) has different tokens, so its saved
state can never be handed to the other.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stored: int = 0  # states kept (a state larger than the whole cache is never kept)
    bytes: int = 0
    entries: int = 0
    limit_bytes: int = 0

    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "stored": self.stored,
                "bytes": self.bytes, "entries": self.entries, "limit_bytes": self.limit_bytes,
                "hit_rate": round(self.hit_rate(), 4)}


class PrefixCache:
    """Saved states by prefix tokens, least recently used evicted first, at most `limit_bytes` in all."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = max(0, limit_bytes)
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(limit_bytes=self.limit_bytes)

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def get(self, tokens: Sequence[int]) -> bytes | None:
        key = tuple(tokens)
        with self._lock:
            state = self._states.get(key)
            if state is None:
                self._stats.misses += 1
                return None
            self._states.move_to_end(key)
            self._stats.hits += 1
            return state

    def put(self, tokens: Sequence[int], state: bytes) -> None:
        if len(state) > self.limit_bytes:
            return
        key = tuple(tokens)
        with self._lock:
            old = self._states.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            while self._states and self._bytes + len(state) > self.limit_bytes:
                _, evicted = self._states.popitem(last=False)
                self._bytes -= len(evicted)
                self._stats.evictions += 1
            self._states[key] = state
            self._bytes += len(state)
            self._stats.stored += 1

    def __contains__(self, tokens: Sequence[int]) -> bool:
        with self._lock:
            return tuple(tokens) in self._states

    def stats(self) -> CacheStats:
        with self._lock:
            return replace(self._stats, bytes=self._bytes, entries=len(self._states))
