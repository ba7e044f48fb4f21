"""One canonical DSPy request as OpenAI-style chat messages, for every engine."""

from __future__ import annotations

from dspy.lm15 import Request


def chat_messages(request: Request) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        # Chat servers of every kind know "system"; fewer know "developer".
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text or ""})
    return messages
