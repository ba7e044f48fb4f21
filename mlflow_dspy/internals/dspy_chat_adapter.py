"""DSPy's ChatAdapter, writing the very same prompts with less CPU per request.

Profiled at one client, formatting took about a fifth of the gateway's own
CPU per request, most of it spent redoing work whose result cannot change:
the system message and the output reminder are functions of the signature
alone, and formatting a plain `str` input builds a pydantic `TypeAdapter(str)`
(about 1 ms: a fresh schema validator) per field per call, only to return the
string unchanged. This subclass remembers the first two and skips the third;
every other value goes through DSPy's own code. A signature with a
`dspy.History` input: DSPy's `Adapter.format` builds the signature without
its history field (`Signature.delete`, a new pydantic class: about 0.85 ms of
CPU a request, and a new class defeats the caches above) on every call; here
it is built once per signature, and the messages are put together in DSPy's
order (tests/test_internals_dspy_chat_adapter.py compares every example's
prompts, each with a history, against DSPy's own).
"""

from __future__ import annotations

import weakref
from typing import Any

import dspy
from dspy.adapters.base import _expand_legacy_custom_type_markers_in_chat_message as _expand_legacy_markers

from mlflow_dspy.internals import speedups_enabled


class ServingChatAdapter(dspy.ChatAdapter):
    """Used by the gateway and batch when the model runs on DSPy's default adapter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Keyed by the signature class itself: per-request signatures (extra
        # instructions from a system message) are dropped with their class.
        self._system_messages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._reminders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._without_history: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def format(self, signature: type[dspy.Signature], demos: list[dict[str, Any]],
               inputs: dict[str, Any]) -> list[dict[str, Any]]:
        history = self._get_history_field_name(signature)
        if history is None:
            return super().format(signature, demos, inputs)
        without = self._without_history.get(signature)
        if without is None:
            without = self._without_history[signature] = signature.delete(history)
        inputs = dict(inputs)
        conversation = self.format_conversation_history(without, history, inputs)  # takes the history out
        messages = [{"role": "system", "content": self.format_system_message(signature)},
                    *self.format_demos(signature, demos), *conversation]
        if content := self.format_user_message_content(without, inputs, main_request=True):
            messages.append({"role": "user", "content": content})
        return [_expand_legacy_markers(message) for message in messages]

    def format_system_message(self, signature: type[dspy.Signature]) -> str:
        message = self._system_messages.get(signature)
        if message is None:
            message = self._system_messages[signature] = super().format_system_message(signature)
        return message

    def user_message_output_requirements(self, signature: type[dspy.Signature]) -> str | None:
        if signature not in self._reminders:
            self._reminders[signature] = super().user_message_output_requirements(signature)
        return self._reminders[signature]

    def format_user_message_content(
        self, signature: type[dspy.Signature], inputs: dict[str, Any], prefix: str = "", suffix: str = "",
        main_request: bool = False,
    ) -> str:
        present = [name for name in signature.input_fields if name in inputs]
        if not all(type(inputs[name]) is str for name in present):
            return super().format_user_message_content(signature, inputs, prefix, suffix, main_request)
        # DSPy's layout, with each str as what format_field_value makes of it: the str itself.
        parts = [prefix, *(f"[[ ## {name} ## ]]\n{inputs[name]}" for name in present)]
        if main_request and (reminder := self.user_message_output_requirements(signature)) is not None:
            parts.append(reminder)
        parts.append(suffix)
        return "\n\n".join(parts).strip()

    def format_field_with_value(self, fields_with_values: dict) -> str:
        if all(type(value) is str for value in fields_with_values.values()):
            # What DSPy's format_field_value makes of a str: the str itself.
            return "\n\n".join(f"[[ ## {field.name} ## ]]\n{value}"
                               for field, value in fields_with_values.items()).strip()
        return super().format_field_with_value(fields_with_values)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for cache in ("_system_messages", "_reminders", "_without_history"):
            state.pop(cache, None)  # caches, not state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._system_messages = weakref.WeakKeyDictionary()
        self._reminders = weakref.WeakKeyDictionary()
        self._without_history = weakref.WeakKeyDictionary()


def serving_adapter(adapter: Any) -> Any:
    """The adapter to serve with: ours in place of DSPy's default (DSPy's own with the speed-ups off),
    anything chosen explicitly as it is."""
    if adapter is not None:
        return adapter
    return ServingChatAdapter() if speedups_enabled() else dspy.ChatAdapter()
