"""The registry is the router: many logged models in one gateway, named as the registry names them,
with aliases followed as they move (hot reload) and traffic split between aliases.

Names (`-m URI`, repeatable):
* `models:/NAME@ALIAS` serves as `NAME@ALIAS`, and as plain `NAME` when the alias is
  `champion` or the only alias served for NAME;
* `models:/NAME/VERSION` serves as `NAME/VERSION`;
* `runs:/...` and `--program` serve under their own names (`--name` overrides a single model's).

Each version loads once: two names that point at the same version share one host.
Every load runs on one loader thread, for the whole process: loading a model
configures `dspy.settings`, which DSPy lets only the thread that first configured it change.

**Hot reload.** Every `reload_interval` seconds the aliases are looked up. When one
has moved, the new version loads in the background and must answer a smoke
request (its logged input example) before it takes new requests; requests
already running finish on the version they started on. A version that fails
to load or to answer leaves the old one serving, and the failure is kept for
`/ready` and counted in `/metrics` (a version refused by its integrity check also
in `mlflow_dspy_model_refusals_total`, by reason); an unreachable registry changes nothing.

**Split.** `NAME=ALIAS:WEIGHT,ALIAS:WEIGHT` sends requests for plain NAME to each
alias by weight; the same `user` (or `x-session-id`) always gets the same alias.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mlflow_dspy.packaging.uris import ModelUri, parse_model_uri
from mlflow_dspy.program.problems import UserProblem
from mlflow_dspy.runtime.host import ProgramHost

log = logging.getLogger("mlflow_dspy.gateway")
CHAMPION = "champion"


class RouterProblem(UserProblem):
    """A gateway set-up that cannot serve (a bad --split, a name served twice); said at start-up."""


@dataclass
class Entry:
    """One served model: its URI, the host answering for it now, and the names it answers to."""

    uri: str
    parsed: ModelUri | None
    names: list[str] = field(default_factory=list)
    host: ProgramHost | None = None
    failure: str | None = None  # the last load or reload that failed, for /ready

    @property
    def follows_alias(self) -> bool:
        return self.parsed is not None and self.parsed.alias is not None


@dataclass(frozen=True)
class Split:
    name: str
    variants: tuple[tuple[str, int], ...]  # (alias, weight)

    @classmethod
    def parse(cls, text: str) -> Split:
        name, sep, rest = text.partition("=")
        variants = []
        for part in rest.split(","):
            alias, colon, weight = part.strip().partition(":")
            if not (alias and colon and weight.strip().isdigit()):
                raise RouterProblem(f"--split {text!r}: write NAME=ALIAS:WEIGHT,ALIAS:WEIGHT "
                                    "(e.g. triage=champion:90,challenger:10)")
            variants.append((alias, int(weight)))
        if not sep or not name or len(variants) < 2 or sum(w for _, w in variants) <= 0:
            raise RouterProblem(f"--split {text!r}: name a model and at least two aliases with weights")
        return cls(name, tuple(variants))

    def pick(self, sticky: str | None) -> str:
        """The alias for one request: by weight; the same sticky key always lands on the same alias."""
        total = sum(weight for _, weight in self.variants)
        if sticky:
            point = int.from_bytes(hashlib.sha256(f"{self.name}\0{sticky}".encode()).digest()[:8], "big") % total
        else:
            point = random.randrange(total)
        for alias, weight in self.variants:
            if point < weight:
                return alias
            point -= weight
        return self.variants[-1][0]


def served_names(uris: list[str]) -> list[tuple[str, ModelUri | None, list[str]]]:
    """Each URI with the names it serves under (a runs:/ URI's name is known only once it loads)."""
    parsed = [(uri, parse_model_uri(uri)) for uri in uris]
    aliases: dict[str, list[str]] = {}
    for _, p in parsed:
        if p.alias:
            aliases.setdefault(p.name, []).append(p.alias)
    named = []
    for uri, p in parsed:
        if p.alias:
            names = [f"{p.name}@{p.alias}"]
            if p.alias == CHAMPION or aliases[p.name] == [p.alias]:
                names.append(p.name)
        elif p.version:
            names = [f"{p.name}/{p.version}"]
        else:
            names = []
        named.append((uri, p, names))
    return named


class Router:
    """The served models by name, with the loads, reloads and splits that keep them current."""

    def __init__(self, load: Callable[[str], ProgramHost], current_version: Callable[[ModelUri], str],
                 smoke: Callable[[ProgramHost], None], splits: tuple[Split, ...] = (),
                 on_reload: Callable[[str, bool], None] | None = None,
                 explain: Callable[[Exception], str] = lambda exc: "") -> None:
        self._load = load  # a URI -> its host (on the loader thread)
        self._current_version = current_version  # an alias URI -> the version it names now (the registry)
        self._smoke = smoke  # raises if a freshly loaded host cannot answer
        self._on_reload = on_reload or (lambda name, ok: None)
        self._explain = explain  # what a client may be told of a failed load ("" for nothing)
        self.splits = {split.name: split for split in splits}
        self.entries: list[Entry] = []
        self._by_name: dict[str, Entry] = {}
        self._versions: dict[str, ProgramHost] = {}  # "NAME/VERSION" or a run's URI -> its loaded host
        self._lock = threading.Lock()
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

    # -- set-up ----------------------------------------------------------------------
    def add_models(self, uris: list[str]) -> None:
        for split in self.splits.values():
            for alias, _ in split.variants:
                uri = f"models:/{split.name}@{alias}"
                if uri not in uris:
                    uris = [*uris, uri]
        for uri, parsed, names in served_names(uris):
            self.entries.append(Entry(uri, parsed, names))

    def add_host(self, host: ProgramHost) -> None:
        """A host built elsewhere (a program served from its code, a test's)."""
        self.entries.append(Entry(host.source, None, [host.name], host))
        self._index()

    def load_all(self, name_override: str | None = None) -> None:
        """Load every entry (on the loader thread); an entry that fails keeps its failure for /ready."""
        for entry in self.entries:
            if entry.host is not None:
                continue
            try:
                entry.host = self._host_for(entry.uri)
            except Exception as exc:
                entry.failure = self._explain(exc)
                log.error("model failed to load: %s", entry.uri, exc_info=exc)
                continue
            if not entry.names:  # a run's model: the name it was registered under
                entry.names = [entry.host.name]
        if name_override and len(self.entries) == 1:
            self.entries[0].names = [name_override]
        self._index()

    def _key(self, uri: str, version: str | None = None) -> str:
        parsed = parse_model_uri(uri)
        if parsed.name and (version or parsed.version):
            return f"{parsed.name}/{version or parsed.version}"
        return uri

    def _host_for(self, uri: str, version: str | None = None) -> ProgramHost:
        """The host of the version a URI names: loaded once, shared by every name that points at it."""
        parsed = parse_model_uri(uri)
        if parsed.alias and version is None:
            version = self._current_version(parsed)
        key = self._key(uri, version)
        if key not in self._versions:
            target = f"models:/{parsed.name}/{version}" if parsed.name and version else uri
            host = self._load(target)
            host.version = version or host.version
            self._versions[key] = host
        return self._versions[key]

    def _index(self) -> None:
        by_name: dict[str, Entry] = {}
        for entry in self.entries:
            for name in entry.names:
                if name in by_name and by_name[name] is not entry:
                    raise RouterProblem(f"two models would be served as {name!r}: {by_name[name].uri} and "
                                        f"{entry.uri}; serve one of them with another alias or version")
                by_name[name] = entry
        self._by_name = by_name

    # -- serving ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return [name for entry in self.entries if entry.host is not None for name in entry.names]

    def loaded(self) -> list[ProgramHost]:
        return [entry.host for entry in self.entries if entry.host is not None]

    def get(self, model: str | None, sticky: str | None = None) -> tuple[ProgramHost, str, str | None]:
        """(host, the name it answers as, the split variant or None) for a request's `model`.

        No model: the first served one. Raises KeyError for a name nobody serves."""
        if not model:
            entry = next(entry for entry in self.entries if entry.host is not None)
            return entry.host, entry.names[0], None
        variant = None
        if model in self.splits:
            variant = self.splits[model].pick(sticky)
            model_name = f"{model}@{variant}"
        else:
            model_name = model
        entry = self._by_name.get(model_name)
        if entry is None or entry.host is None:
            raise KeyError(model)
        return entry.host, model, variant

    def failures(self) -> dict[str, str]:
        return {entry.names[0] if entry.names else entry.uri: entry.failure
                for entry in self.entries if entry.failure is not None}

    # -- hot reload --------------------------------------------------------------------
    def check_aliases(self) -> list[str]:
        """Follow every alias that moved (on the loader thread); returns the names that switched."""
        switched = []
        for entry in self.entries:
            if not entry.follows_alias or entry.host is None:
                continue
            try:
                version = self._current_version(entry.parsed)
            except Exception as exc:  # the registry is unreachable: keep serving what we have
                log.warning("the registry did not answer for %s (%s): serving version %s still",
                            entry.uri, type(exc).__name__, entry.host.version)
                continue
            if version == entry.host.version:
                continue
            name, stage = entry.names[0], "load"
            try:
                host = self._host_for(entry.uri, version)
                stage = "answer"
                self._smoke(host)
            except Exception as exc:
                failed = self._versions.pop(self._key(entry.uri, version), None)
                if failed is not None and all(other.host is not failed for other in self.entries):
                    failed.release()  # loaded but did not answer: its private copy goes
                why = self._explain(exc)
                entry.failure = (f"version {version} failed to {stage}" + (f" ({why})" if why else "")
                                 + f"; version {entry.host.version} serves")
                log.error("reload of %s to version %s failed; version %s keeps serving", name, version,
                          entry.host.version, exc_info=exc)
                self._on_reload(name, False)
                continue
            old, entry.host, entry.failure = entry.host, host, None  # new requests from here on
            if all(other.host is not old for other in self.entries):
                # Requests running on the old version keep it alive until they finish; the router lets go,
                # and its private copy's code leaves sys.path (packaging/integrity.py).
                self._versions = {key: kept for key, kept in self._versions.items() if kept is not old}
                old.release()
            log.info("%s now serves version %s", name, version)
            self._on_reload(name, True)
            switched.append(name)
        return switched
