"""The road of one chat request through the package, counted: the files of mlflow_dspy whose code runs while
the gateway answers a non-streamed /v1/chat/completions, in the order they are first entered. In process, as
a user serves a program: its default adapter, the HTTP engine on the stub LM, the gateway started (the
speed-ups installed, traces on). The README's architecture section draws this road and gives its length."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import httpx

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.lm_engine.select import adapter_for, build_lm
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat
from tests.support.processes import ROOT, stub_lm

PACKAGE = str(ROOT / "mlflow_dspy") + "/"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def road(base: str) -> tuple[list[str], int]:
    """The package's files a chat request runs code in, in order of first entry, and how many times the
    request comes back to a file it had already left."""
    lm = build_lm("openai/stub", api_base=base)
    host = ProgramHost(example_chat("qa"), lm, adapter_for(lm), "qa", "test")
    app = create_app(GatewayConfig(trace_flush_timeout=5), host=host)
    visited: list[str] = []

    def profile(frame, event, _arg) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            name = frame.f_code.co_filename[len(PACKAGE):]
            if not visited or visited[-1] != name:
                visited.append(name)

    async def ask() -> None:
        async with app.lifespan(app.app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200  # warm
            sys.setprofile(profile)
            try:
                answered = await client.post("/v1/chat/completions", json=CHAT)
            finally:
                sys.setprofile(None)
            assert answered.status_code == 200

    asyncio.run(ask())
    first_seen = list(dict.fromkeys(visited))
    return first_seen, len(visited) - len(first_seen)


def test_the_readme_gives_the_length_of_a_chat_requests_road(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with stub_lm(tmp_path) as base:
        files, returns = road(base)
    assert files[0] == "gateway/app.py" and "runtime/run.py" in files and "program/chat.py" in files
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"passes through (\d+) files of the package", readme)
    assert stated, "the README's architecture section says how many files a chat request passes through"
    assert int(stated.group(1)) == len(files), f"the road is now {len(files)} files: {files}"
    assert Path(ROOT / "mlflow_dspy" / files[-1]).is_file() and returns >= 0
