"""`make flywheel` on the embedded model: served, rated, improved, and the decision shows in who answers."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.support.cli import store_env
from tests.support.processes import ROOT

pytestmark = pytest.mark.embedded  # scripts/flywheel.py (a subprocess) serves, rates and improves on it


def test_the_flywheel_rates_answers_improves_and_the_alias_decides_who_answers(tmp_path):
    env = store_env(tmp_path)  # no DSPY_LM: the embedded model
    done = subprocess.run([sys.executable, "scripts/flywheel.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout
    rated = re.findall(r"-> .*: (rated up|rated down, with .+)", out)
    assert len(rated) == 10  # every answer was rated
    decision = re.search(r"(promoted|kept the champion): candidate version (\d+), improve run (\w+)", out)
    answered = re.search(r"answered by dspy-qa/(\d+)", out)
    assert decision and answered
    registry = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = str(registry.get_model_version_by_alias("dspy-qa", "champion").version)
    # Who answers afterwards is whoever the decision left holding the alias.
    assert answered.group(1) == champion
    assert (champion == decision.group(2)) == (decision.group(1) == "promoted")
    run = registry.get_run(decision.group(3))
    assert run.data.tags["decision"] == decision.group(1) and run.data.tags["why"] in out
