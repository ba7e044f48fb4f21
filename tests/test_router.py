"""The router's rules, with hosts made in process (no registry): names, shared versions, splits, reloads."""

from __future__ import annotations

from collections import Counter

import dspy
import pytest

from mlflow_dspy.gateway.router import Router, RouterProblem, Split, served_names
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost


class Registry:
    """Aliases that move, and a record of which versions were loaded."""

    def __init__(self, aliases: dict[tuple[str, str], str]) -> None:
        self.aliases = aliases
        self.loads: list[str] = []
        self.down = False
        self.broken: set[str] = set()  # URIs that fail to load
        self.mute: set[str] = set()  # versions that load but fail the smoke request

    def load(self, uri: str) -> ProgramHost:
        self.loads.append(uri)
        if uri in self.broken:
            raise RuntimeError("cannot unpickle")
        name = uri.removeprefix("models:/").split("/")[0]
        host = ProgramHost(ChatProgram(dspy.Predict("question -> answer")), None, None, name, uri)
        host.version = uri.rsplit("/", 1)[1]
        return host

    def current(self, parsed) -> str:
        if self.down:
            raise ConnectionError("registry down")
        return self.aliases[(parsed.name, parsed.alias)]

    def smoke(self, host: ProgramHost) -> None:
        if host.version in self.mute:
            raise RuntimeError("no answer")


def router(registry: Registry, uris: list[str], splits=(), reloads=None) -> Router:
    r = Router(registry.load, registry.current, registry.smoke, splits,
               on_reload=(lambda name, ok: reloads.append((name, ok))) if reloads is not None else None)
    r.add_models(uris)
    r.load_all()
    return r


def test_names_follow_the_registry():
    named = {uri: names for uri, _, names in served_names(
        ["models:/triage@champion", "models:/triage@challenger", "models:/faq@staging", "models:/qa/3"])}
    assert named["models:/triage@champion"] == ["triage@champion", "triage"]  # champion is also plain NAME
    assert named["models:/triage@challenger"] == ["triage@challenger"]
    assert named["models:/faq@staging"] == ["faq@staging", "faq"]  # the only alias served for faq
    assert named["models:/qa/3"] == ["qa/3"]


def test_two_names_for_one_version_share_one_loaded_host():
    registry = Registry({("triage", "champion"): "2"})
    r = router(registry, ["models:/triage@champion", "models:/triage/2", "models:/faq/1"])
    assert registry.loads == ["models:/triage/2", "models:/faq/1"]  # version 2 loaded once
    assert r.get("triage")[0] is r.get("triage/2")[0] is r.get("triage@champion")[0]
    assert sorted(r.names()) == ["faq/1", "triage", "triage/2", "triage@champion"]
    with pytest.raises(KeyError):
        r.get("nobody")


def test_a_split_sends_traffic_by_weight_and_a_sticky_user_stays_put():
    registry = Registry({("triage", "champion"): "1", ("triage", "challenger"): "2"})
    r = router(registry, [], splits=(Split.parse("triage=champion:90,challenger:10"),))
    picks = Counter(r.get("triage")[2] for _ in range(4000))
    assert abs(picks["challenger"] / 4000 - 0.10) < 0.02
    assert len({r.get("triage", sticky="user-42")[2] for _ in range(50)}) == 1
    assert r.get("triage", sticky="user-42")[0].version == {"champion": "1", "challenger": "2"}[
        r.get("triage", sticky="user-42")[2]]


@pytest.mark.parametrize("text", ["triage", "triage=champion:90", "triage=champion:x,challenger:1", "=a:1,b:2"])
def test_a_bad_split_is_refused_with_its_form(text):
    with pytest.raises(RouterProblem, match="--split"):
        Split.parse(text)


def test_an_alias_that_moves_is_followed_after_its_new_version_answers():
    registry = Registry({("triage", "champion"): "1"})
    reloads: list = []
    r = router(registry, ["models:/triage@champion"], reloads=reloads)
    old = r.get("triage")[0]
    registry.aliases[("triage", "champion")] = "2"
    assert r.check_aliases() == ["triage@champion"]
    new = r.get("triage")[0]
    assert (old.version, new.version) == ("1", "2") and reloads == [("triage@champion", True)]
    assert r.check_aliases() == []  # nothing moved since
    assert old not in r._versions.values()  # the replaced version is not kept for ever


def test_a_new_version_that_fails_to_load_or_answer_leaves_the_old_one_serving():
    registry = Registry({("triage", "champion"): "1"})
    reloads: list = []
    r = router(registry, ["models:/triage@champion"], reloads=reloads)
    registry.aliases[("triage", "champion")] = "2"
    registry.broken.add("models:/triage/2")
    assert r.check_aliases() == [] and r.get("triage")[0].version == "1"
    assert r.failures() == {"triage@champion": "version 2 failed to load; version 1 serves"}
    registry.aliases[("triage", "champion")] = "3"
    registry.mute.add("3")
    assert r.check_aliases() == [] and r.get("triage")[0].version == "1"
    assert "version 3 failed to answer" in r.failures()["triage@champion"]
    assert reloads == [("triage@champion", False), ("triage@champion", False)]


def test_an_unreachable_registry_changes_nothing():
    registry = Registry({("triage", "champion"): "1"})
    r = router(registry, ["models:/triage@champion"])
    registry.down = True
    assert r.check_aliases() == [] and r.get("triage")[0].version == "1" and not r.failures()


def test_a_name_served_twice_is_refused():
    registry = Registry({("triage", "champion"): "1"})
    r = Router(registry.load, registry.current, registry.smoke)
    r.add_models(["models:/triage@champion"])
    r.load_all()
    with pytest.raises(RouterProblem, match="two models would be served as 'triage'"):
        r.add_host(ProgramHost(ChatProgram(dspy.Predict("q -> a")), None, None, "triage", "program:x"))
