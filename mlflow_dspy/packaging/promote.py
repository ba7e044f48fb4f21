"""Move a registry alias to a version only when it scores at least as well.

Each version's dev score is its `dev_score` tag (set by log, eval and
optimize); a version without one is refused until `eval` has scored it. Who promoted, when and
why are recorded as tags on the promoted version. Rolling back is promoting
the earlier version again (with --force if it scores lower).
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_dspy.packaging.log import use_tracking_store
from mlflow_dspy.runtime.scoring import SCORE_METRIC


class PromotionRefused(Exception):
    pass


@dataclass
class Promotion:
    name: str
    alias: str
    version: str
    score: float
    previous_version: str | None
    previous_score: float | None
    forced: bool


def version_score(client: MlflowClient, name: str, version: str) -> float:
    tags = client.get_model_version(name, version).tags
    try:
        return float(tags[SCORE_METRIC])
    except (KeyError, ValueError):
        raise PromotionRefused(
            f"version {version} of {name} has no dev score; score it first: "
            f"mlflow-dspy eval -m models:/{name}/{version} --dev FILE"
        ) from None


def current_holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(name: str, version: str, alias: str = "champion", force: bool = False,
            reason: str | None = None) -> Promotion:
    use_tracking_store()
    client = MlflowClient()
    score = version_score(client, name, version)
    previous = current_holder(client, name, alias)
    previous_score = version_score(client, name, previous) if previous and previous != version else None
    if previous_score is not None and score < previous_score and not force:
        raise PromotionRefused(
            f"version {version} scores {score:.2f} on the dev set, below version {previous} ({previous_score:.2f}) "
            f"which holds @{alias}; use --force to promote it anyway"
        )
    client.set_registered_model_alias(name, alias, version)
    who = os.environ.get("MLFLOW_DSPY_USER") or getpass.getuser()
    tags = {
        f"promoted_{alias}_by": who,
        f"promoted_{alias}_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"promoted_{alias}_reason": reason or ("forced" if force else "dev score at least the previous holder's"),
        f"promoted_{alias}_previous": previous or "none",
        f"promoted_{alias}_forced": str(bool(force and previous_score is not None and score < previous_score)).lower(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return Promotion(name, alias, version, score, previous, previous_score, force)
