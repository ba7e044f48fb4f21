"""Agent frameworks and structured-output clients, as they are installed and run by a user, against real
gateways: openai-agents with a function tool and with an output_type (chat and Responses models),
pydantic-ai with a tool and with a structured output_type, LangChain bind_tools and with_structured_output
(both methods), instructor in TOOLS and JSON modes, the openai SDK's responses.parse; and DSPy itself with the
gateway as its LM through the Responses API.

Each client runs in a virtualenv of its own pinned set (tests/clients/agents.txt, instructor.txt: the two
cannot share one openai), built once per session; each call is tests/clients/scenarios.py in that venv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from tests.support.processes import gateway
from tests.support.venv import UV, bin_path, clean_env

pytestmark = pytest.mark.slow

CLIENTS = Path(__file__).parent / "clients"
PROGRAMS = "tests/support/client_programs.py"
TRIAGE = {"category": "billing", "priority": 2}


def _venv(base: Path, lock: str) -> Path:
    """A client's virtualenv with exactly its lock's pins, made by uv, as the run's
    `installed` venv gets the runtime lock (tests/support/venv.py), without hashes: these locks name no hashes.
    uv took 1 s and 1.3 CPU-seconds for the 60 packages of agents.txt where pip took about a minute."""
    venv = base / lock.removesuffix(".txt")
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=clean_env())
    installed = subprocess.run([str(UV), "pip", "install", "-q", "--python", str(bin_path(venv, "python")),
                                "--no-deps", "-r", str(CLIENTS / lock)], capture_output=True, text=True,
                               env=clean_env())
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="session")
def client_venvs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("client_venvs")
    return {lock: _venv(base, lock) for lock in ("agents.txt", "instructor.txt")}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("client_gateways")
    served = {}
    with gateway(["--program", f"{PROGRAMS}:qa", "--name", "qa-model", "--lm", "openai/unused"], tmp,
                 "--no-traces") as qa, \
            gateway(["--program", f"{PROGRAMS}:triage", "--name", "triage-model", "--lm", "openai/unused"], tmp,
                    "--no-traces") as triage:
        served["qa"], served["triage"] = qa, triage
        yield served["qa"], served["triage"]


def run(venvs: dict[str, Path], gateways: tuple[str, str], scenario: str) -> dict:
    venv = venvs["instructor.txt" if scenario.startswith("instructor/") else "agents.txt"]
    done = subprocess.run([str(bin_path(venv, "python")), str(CLIENTS / "scenarios.py"), scenario, *gateways],
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("scenario", ["openai-agents/chat-tool", "openai-agents/responses-tool",
                                      "pydantic-ai/tool"])
def test_an_agent_with_a_function_tool_gets_the_programs_answer_in_text(client_venvs, gateways, scenario):
    assert run(client_venvs, gateways, scenario)["output"] == "Hello from DSPy"


def test_langchain_bind_tools_gets_the_answer_in_text_and_no_tool_call(client_venvs, gateways):
    result = run(client_venvs, gateways, "langchain/bind_tools")
    assert (result["output"], result["tool_calls"]) == ("Hello from DSPy", [])


@pytest.mark.parametrize("scenario", [
    "openai-agents/chat-output", "openai-agents/responses-output",  # response_format / text.format json_schema
    "pydantic-ai/output",  # a forced output tool
    "langchain/function_calling", "langchain/json_schema",
    "instructor/tools", "instructor/json",
    "openai/responses.parse",
])
def test_structured_output_the_way_each_client_asks_for_it_gets_the_programs_typed_outputs(
        client_venvs, gateways, scenario):
    assert run(client_venvs, gateways, scenario)["output"] == TRIAGE


def test_dspy_with_the_gateway_as_its_responses_lm_gets_the_programs_answer(gateways):
    qa, _ = gateways
    lm = dspy.LM("openai/qa-model", api_base=f"{qa}/v1", api_key="unused", model_type="responses", cache=False)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = dspy.Predict("question -> answer")(question="Say hello")
    assert prediction.answer == "Hello from DSPy"
