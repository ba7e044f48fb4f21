"""Feedback tokens: the proof that a caller got the answer it rates.

Every answer that names its trace (`x-mlflow-trace-id`) also carries `x-mlflow-feedback-token`: an
HMAC-SHA256, under the gateway's feedback secret, of the trace id, the caller's identity (its API key's
name, `anonymous` without keys), and the model and version that answered. `POST /v1/feedback` requires it
back (the same header) from the same caller: another key, or anyone who only knows the trace id, cannot
rate that answer. The token carries the model and version in clear (they are in the answer's headers
already), so feedback needs no look-up of the trace to know which program's outputs `expected` names.

The secret comes from `MLFLOW_DSPY_FEEDBACK_SECRET` (several replicas must share it: from a Kubernetes
Secret), a comma-separated list to rotate it: the first signs, any verifies. Unset, `mlflow-dspy gateway`
makes one at start-up for its workers and says so: tokens then stop working at a restart, and on any other
replica.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets

from mlflow_dspy.program.problems import UserProblem

SECRET_ENV = "MLFLOW_DSPY_FEEDBACK_SECRET"
HEADER = "x-mlflow-feedback-token"
MIN_SECRET_CHARACTERS = 32
VERSION = "fb1"

log = logging.getLogger("mlflow_dspy.gateway")


class SecretProblem(UserProblem):
    """A feedback secret that cannot be used."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class FeedbackTokens:
    """Signs an answer's token and checks one given back."""

    def __init__(self, secrets_: list[str]) -> None:
        if not secrets_:
            raise SecretProblem(f"{SECRET_ENV} holds no secret")
        short = [s for s in secrets_ if len(s) < MIN_SECRET_CHARACTERS]
        if short:
            raise SecretProblem(f"{SECRET_ENV}: each secret must be at least {MIN_SECRET_CHARACTERS} characters "
                                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self._keys = [s.encode() for s in secrets_]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FeedbackTokens:
        """The secrets in MLFLOW_DSPY_FEEDBACK_SECRET; unset, one made for this process, with a warning."""
        raw = (os.environ if environ is None else environ).get(SECRET_ENV, "")
        given = [part.strip() for part in raw.split(",") if part.strip()]
        if not given:
            log.warning("%s is not set: feedback tokens are signed with a secret made for this process; they stop "
                        "working when it restarts, and another replica refuses them", SECRET_ENV)
            given = [new_secret()]
        return cls(given)

    def sign(self, trace_id: str, caller: str, model: str, version: str) -> str:
        """The token of an answer: `fb1.<model and version>.<mac>` (URL-safe base64)."""
        about = _b64(json.dumps([model, version]).encode())
        return f"{VERSION}.{about}.{_b64(self._mac(self._keys[0], trace_id, caller, about))}"

    def check(self, token: str | None, trace_id: str, caller: str) -> tuple[str, str] | None:
        """The (model, version) a valid token names for this trace and caller; None for any other token."""
        if not token:
            return None
        version, _, rest = token.partition(".")
        about, _, mac = rest.partition(".")
        if version != VERSION or not about or not mac or len(token) > 1000:
            return None
        try:
            given = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except (binascii.Error, ValueError):
            return None
        # Every secret compared, in constant time each: rotation keeps the previous secret's tokens good.
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(given, self._mac(key, trace_id, caller, about))
        if not valid:
            return None
        try:  # signed by us: what we wrote
            model, answered_by = json.loads(base64.urlsafe_b64decode(about + "=" * (-len(about) % 4)))
        except (binascii.Error, ValueError, TypeError):
            return None
        return (model, answered_by) if isinstance(model, str) and isinstance(answered_by, str) else None

    @staticmethod
    def _mac(key: bytes, trace_id: str, caller: str, about: str) -> bytes:
        message = json.dumps([VERSION, trace_id, caller, about]).encode()
        return hmac.new(key, message, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
