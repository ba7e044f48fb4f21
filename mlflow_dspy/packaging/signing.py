"""Ed25519 keys and signatures for model manifests, from `cryptography` (pyca, already in the lock).

A signing key is an Ed25519 private key in a PEM file (PKCS#8, unencrypted: keep it 0600, in your CI's secret
store). A trust key is its public key: a PEM file, or the inline form `ed25519:<base64 of the 32 raw bytes>`
(one line, for an environment variable). `mlflow-dspy keys --out DIR` writes a pair.

Why Ed25519 from `cryptography` rather than OpenSSF's `model-signing`: the package is already in the lock (no
new dependency and its tree in every artifact's pins), a signature is 64 bytes over one file (our manifest) with
no certificate chain, transparency log or network, and verifying takes microseconds. `model-signing` signs a
whole folder the same way (per-file SHA-256 in an in-toto statement) but pulls sigstore's client and its
dependencies into the runtime; its key-based mode is Ed25519/ECDSA over the same kind of digest list.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mlflow_dspy.program.problems import UserProblem

SIGNING_KEY_ENV = "MLFLOW_DSPY_SIGNING_KEY"  # a path to the private key's PEM file
TRUST_KEY_ENV = "MLFLOW_DSPY_TRUST_KEY"  # public keys: PEM file paths or ed25519:BASE64, comma-separated
INLINE_PREFIX = "ed25519:"
ALGORITHM = "ed25519"


class KeyProblem(UserProblem):
    """A signing or trust key that cannot be read (no such file, not an Ed25519 key)."""


@dataclass(frozen=True)
class TrustKey:
    key: Ed25519PublicKey
    key_id: str  # 16 hex digits of the SHA-256 of the raw public key: what a signature names
    source: str  # where it was read from, for messages


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def inline(public: Ed25519PublicKey) -> str:
    """The one-line form of a public key: ed25519:BASE64."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return INLINE_PREFIX + base64.b64encode(raw).decode()


def generate(folder: Path) -> tuple[Path, Path]:
    """A new key pair in `folder`: signing.pem (the private key, mode 0600) and trust.pem (its public key)."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "signing.pem", folder / "trust.pem"
    for path in (private, public):
        if path.exists():
            raise KeyProblem(f"{path} exists already: keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyProblem(f"signing key not found: {path}") from None
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyProblem(f"{path} holds a {type(key).__name__}, not an Ed25519 key (mlflow-dspy keys makes one)")
    return key


def signing_key_from(path: str | Path | None) -> Ed25519PrivateKey | None:
    """The key `path` names, else the one $MLFLOW_DSPY_SIGNING_KEY names, else None (the manifest unsigned)."""
    path = path or os.environ.get(SIGNING_KEY_ENV, "").strip()
    return load_signing_key(path) if path else None


def _trust_key(spec: str) -> TrustKey:
    spec = spec.strip()
    if spec.startswith(INLINE_PREFIX):
        try:
            raw = base64.b64decode(spec[len(INLINE_PREFIX):], validate=True)
            public = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise KeyProblem(f"trust key {spec!r}: write ed25519: and the base64 of the 32-byte key") from None
        return TrustKey(public, key_id(public), "inline")
    path = Path(spec).expanduser()
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyProblem(f"trust key not found: {path} (a PEM file, or ed25519:BASE64)") from None
    except ValueError as exc:
        raise KeyProblem(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyProblem(f"{path} holds a {type(public).__name__}, not an Ed25519 public key")
    return TrustKey(public, key_id(public), str(path))


def trust_keys_from(specs: list[str] | tuple[str, ...] | None = None) -> tuple[TrustKey, ...]:
    """The trust keys given (PEM paths or ed25519:BASE64), else those of $MLFLOW_DSPY_TRUST_KEY; () for none."""
    if not specs:
        specs = [part for part in os.environ.get(TRUST_KEY_ENV, "").replace(" ", ",").split(",") if part.strip()]
    return tuple(_trust_key(spec) for spec in specs)


def sign(message: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature document (JSON) of `message`: algorithm, the signer's key id, the signature in base64."""
    document = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
                "signature": base64.b64encode(key.sign(message)).decode()}
    return (json.dumps(document, indent=1) + "\n").encode()


class BadSignature(Exception):
    """Why a signature is not accepted: `reason` is one of unsigned, untrusted_key, bad_signature."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check(message: bytes, document: bytes | None, keys: tuple[TrustKey, ...]) -> TrustKey:
    """The trust key whose signature `document` carries over `message`; BadSignature otherwise."""
    if document is None:
        raise BadSignature("unsigned", "its manifest is not signed")
    try:
        parsed = json.loads(document)
        signature = base64.b64decode(parsed["signature"], validate=True)
        named = str(parsed.get("key_id", ""))
        algorithm = parsed.get("algorithm")
    except (ValueError, KeyError, TypeError):
        raise BadSignature("bad_signature", "its manifest's signature file is unreadable") from None
    if algorithm != ALGORITHM:
        raise BadSignature("bad_signature", f"its manifest is signed with {algorithm!r}, not {ALGORITHM}")
    for trusted in keys:
        try:
            trusted.key.verify(signature, message)
            return trusted
        except InvalidSignature:
            continue
    if named not in {k.key_id for k in keys}:
        raise BadSignature("untrusted_key", f"its manifest is signed by key {named or '?'}, which is not "
                                                f"a trust key here ({', '.join(k.key_id for k in keys)})")
    raise BadSignature("bad_signature", f"its manifest's signature by key {named} does not match the "
                                            "manifest (the manifest or the signature was changed)")
