"""What a logged model is allowed to be: a manifest of its files, signed, checked on a private copy before
anything of it is imported or unpickled.

At log time (`log`, `optimize`, `improve`) the model's folder gets `manifest.json`: every file of the artifact
(MLmodel, code/, data/, the pins, the state, whatever the flavor wrote) with its SHA-256. With a signing key
(`--signing-key PEM` or $MLFLOW_DSPY_SIGNING_KEY) it also gets `manifest.sig`, an Ed25519 signature of the
manifest's bytes (packaging/signing.py). The digest of the whole folder is still recorded as the
`model_sha256` tag of the run, the version and the logged model.

Before a model is loaded (`gateway`, `serve`, `batch`, `eval -m`, `load_chat_model`), `fetch_verified`
downloads it into a private directory (mode 0700, made for this load, under $MLFLOW_DSPY_MODEL_COPIES or the
system's temporary folder) and checks that copy: with trust keys (`--trust-key` or $MLFLOW_DSPY_TRUST_KEY), the
manifest must be signed by one of them; always, every file must match the manifest, with no file missing and
none added; without trust keys, the folder's digest must also match the `model_sha256` tag when there is one.
Only that copy is then loaded (its `code/` on sys.path while it is served), so a file changed in the store
after the check changes nothing that runs.

A model logged before manifests existed is checked against its `model_sha256` tag alone, with a warning, and
refused under a trust key.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from mlflow_dspy.packaging import signing
from mlflow_dspy.packaging.signing import BadSignature, TrustKey
from mlflow_dspy.packaging.uris import ModelUriProblem, parse_model_uri

log = logging.getLogger("mlflow_dspy.integrity")

DIGEST_TAG = "model_sha256"
SIGNED_BY_TAG = "manifest_signed_by"
ALLOW_UNVERIFIED_ENV = "MLFLOW_DSPY_ALLOW_UNVERIFIED"
COPIES_ENV = "MLFLOW_DSPY_MODEL_COPIES"  # where private copies are made (default: the temporary folder)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MANIFEST_FORMAT = "mlflow-dspy-manifest/1"
# Written by MLflow when a models:/ URI is downloaded (name and number, plain YAML, never executed), so it
# differs between copies: neither listed nor hashed.
UNHASHED = {"registered_model_meta"}
# Not in the manifest: itself, its signature (added after the manifest, possibly later) and UNHASHED.
UNLISTED = UNHASHED | {MANIFEST, SIGNATURE}

# Why a model is refused: what /metrics counts (mlflow_dspy_model_refusals_total{reason}).
SAID = {
    "tampered": "its files do not match the SHA-256 recorded when it was logged",
    "unsigned": "refused: it is not signed, and this server trusts only signed models",
    "untrusted_key": "refused: it is signed by a key this server does not trust",
    "bad_signature": "refused: its signature does not match its manifest",
    "unverified": "refused: it has no manifest and no recorded SHA-256 to check it against",
    "unsafe_copy": "refused: its private copy could not be made safely",
}


class IntegrityError(RuntimeError):
    """A model refused before anything of it was loaded; `reason` is a key of SAID."""

    def __init__(self, message: str, reason: str = "tampered") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def said(self) -> str:
        """What a client may be told (on /ready)."""
        return SAID.get(self.reason, SAID["tampered"])


# -- hashing -------------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> bytes:
    inner = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            inner.update(block)
    return inner.digest()


def file_hashes(directory: str | Path) -> dict[str, bytes]:
    """Every regular file under `directory` (POSIX relative path -> SHA-256), sorted; a symbolic link anywhere
    is an IntegrityError (a copy must hold its own bytes, not point elsewhere)."""
    root = Path(directory)
    found: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise IntegrityError(f"{relative} in the model is a symbolic link; refusing to load it")
            if name in files and not stat.S_ISREG(mode):
                raise IntegrityError(f"{relative} in the model is not a regular file; refusing to load it")
            if name in files:
                found[relative] = _file_sha256(path)
    return dict(sorted(found.items()))


def digest_of(hashes: dict[str, bytes]) -> str:
    """The folder's digest from its files' hashes: each relative path and its file's SHA-256, in order."""
    outer = hashlib.sha256()
    for relative, inner in sorted(hashes.items()):
        if relative not in UNHASHED and relative != SIGNATURE:
            outer.update(relative.encode() + b"\0" + inner)
    return outer.hexdigest()


def digest(directory: str | Path) -> str:
    """SHA-256 over every file under `directory` (but UNHASHED and the manifest's signature): its relative path
    and its bytes, in order. The `model_sha256` tag."""
    return digest_of(file_hashes(directory))


# -- the manifest ------------------------------------------------------------------------------------------
def manifest_bytes(directory: str | Path) -> bytes:
    """The manifest of `directory`: every file but UNLISTED with its SHA-256 (hex), as stable JSON."""
    files = {rel: inner.hex() for rel, inner in file_hashes(directory).items() if rel not in UNLISTED}
    document = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(directory: str | Path, key: signing.Ed25519PrivateKey | None = None) -> list[Path]:
    """Write `manifest.json` into `directory` (and `manifest.sig` with `key`); the files written."""
    root = Path(directory)
    body = manifest_bytes(root)
    (root / MANIFEST).write_bytes(body)
    written = [root / MANIFEST]
    (root / SIGNATURE).unlink(missing_ok=True)
    if key is not None:
        (root / SIGNATURE).write_bytes(signing.sign(body, key))
        written.append(root / SIGNATURE)
    return written


def _listed(uri: str, body: bytes) -> dict[str, str]:
    try:
        document = json.loads(body)
        files = document["files"]
        if document.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError
        return {str(k): str(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{uri}: its {MANIFEST} is not a manifest this version of mlflow-dspy reads; "
                             "refusing to load it") from None


def _compare(uri: str, listed: dict[str, str], hashes: dict[str, bytes]) -> None:
    present = {rel: inner.hex() for rel, inner in hashes.items() if rel not in UNLISTED}
    missing = sorted(set(listed) - set(present))
    added = sorted(set(present) - set(listed))
    changed = sorted(rel for rel in set(listed) & set(present) if listed[rel] != present[rel])
    if not (missing or added or changed):
        return
    said = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("changed", changed), ("added", added), ("missing", missing)) if names]
    raise IntegrityError(f"{uri}: the model's files do not match the SHA-256 recorded when it was logged "
                         f"({'; '.join(said)}); refusing to load it")


# -- the registry's record (models without a trust key) -------------------------------------------------
def recorded_digest(uri: str) -> str | None:
    """The digest recorded for `uri`: the version's tag for models:/, the run's tag for runs:/."""
    try:
        parsed = parse_model_uri(uri)
    except ModelUriProblem:
        return None  # a local folder: nothing recorded
    client = MlflowClient()
    if parsed.run_id:
        return _run_digest(client, parsed.run_id)
    if parsed.model_id:
        return client.get_logged_model(parsed.model_id).tags.get(DIGEST_TAG)
    if parsed.alias:
        version = client.get_model_version_by_alias(parsed.name, parsed.alias)
    else:
        version = client.get_model_version(parsed.name, parsed.version)
    return version.tags.get(DIGEST_TAG) or (_run_digest(client, version.run_id) if version.run_id else None)


def _run_digest(client: MlflowClient, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get(DIGEST_TAG)


# -- verifying -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verified:
    """What a check established about a local copy."""

    digest: str
    manifest: bool  # checked file by file against its manifest
    signed_by: str | None = None  # the trust key's id whose signature was checked

    def describe(self) -> str:
        if self.signed_by:
            return f"manifest signed by trust key {self.signed_by}"
        return "manifest and recorded SHA-256" if self.manifest else f"recorded {DIGEST_TAG} only"


def verify(uri: str, local: str | Path, trust: tuple[TrustKey, ...] | None = None) -> Verified:
    """Check the local copy `local` of `uri`; IntegrityError if it may not be loaded.

    `trust`: the public keys a manifest must be signed by (None: those of $MLFLOW_DSPY_TRUST_KEY; (): none)."""
    trust = signing.trust_keys_from() if trust is None else trust
    root = Path(local)
    hashes = file_hashes(root)
    actual = digest_of(hashes)
    body = (root / MANIFEST).read_bytes() if MANIFEST in hashes else None
    if body is None:
        return _legacy(uri, actual, trust)
    signer = None
    if trust:
        document = (root / SIGNATURE).read_bytes() if SIGNATURE in hashes else None
        try:
            signer = signing.check(body, document, trust).key_id
        except BadSignature as problem:
            raise IntegrityError(f"{uri}: {problem}; a trust key is set, so only a manifest signed by one of its "
                                 "keys is loaded; refusing to load it", problem.reason) from None
    _compare(uri, _listed(uri, body), hashes)
    if signer is None:
        # No signature checked: the registry's tag is a second record, kept apart from the artifact store.
        expected = recorded_digest(uri)
        if expected is not None and expected != actual:
            raise IntegrityError(f"{uri}: the model's files match its manifest but do not match the SHA-256 "
                                 f"recorded when it was logged in its {DIGEST_TAG} tag (expected {expected[:12]}..., "
                                 f"found {actual[:12]}...): the manifest was rewritten with them, or the tag "
                                 "changed; refusing to load it")
    return Verified(actual, manifest=True, signed_by=signer)


def _legacy(uri: str, actual: str, trust: tuple[TrustKey, ...]) -> Verified:
    """A model logged before manifests: its folder's digest against the `model_sha256` tag."""
    if trust:
        raise IntegrityError(f"{uri} has no {MANIFEST} (it was logged before mlflow-dspy signed models), and a "
                             "trust key is set: log it again with --signing-key; refusing to load it", "unsigned")
    expected = recorded_digest(uri)
    if expected is None:
        if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
            log.warning("%s has no manifest and no recorded %s: loaded unverified (%s=1)", uri, DIGEST_TAG,
                        ALLOW_UNVERIFIED_ENV)
            return Verified(actual, manifest=False)
        raise IntegrityError(f"{uri} has no {MANIFEST} and no recorded {DIGEST_TAG} tag, so it cannot be checked "
                             f"before loading; log it with `mlflow-dspy log`, or set {ALLOW_UNVERIFIED_ENV}=1 "
                             "to load it unverified", "unverified")
    if actual != expected:
        raise IntegrityError(f"{uri}: the model's files do not match the SHA-256 recorded when it was logged "
                             f"(expected {expected[:12]}..., found {actual[:12]}...); refusing to load it")
    log.warning("%s has no manifest (logged before mlflow-dspy 0.4): it was checked against its %s tag only, "
                "which anyone who can write to the tracking store can change along with the files; log it again "
                "(with --signing-key) to get a manifest", uri, DIGEST_TAG)
    return Verified(actual, manifest=False)


# -- private copies ------------------------------------------------------------------------------------------
@dataclass
class PrivateCopy:
    """A model downloaded into a directory of this process's own (0700) and verified there."""

    uri: str
    root: Path  # the directory made for it (removed by `release`)
    path: Path  # the model's folder inside it: what is loaded
    verified: Verified
    released: bool = field(default=False)

    def release(self) -> None:
        """The model is no longer served: its code/ leaves sys.path, and its files are removed (at once when
        no imported module came from them, else when the process exits)."""
        with _LOCK:
            if self.released:
                return
            self.released = True
            prefix = str(self.root) + os.sep
            sys.path[:] = [entry for entry in sys.path if not str(entry).startswith(prefix)]
            if _imported_from(prefix):
                _LEFT_FOR_EXIT.append(self.root)  # a module of it may still import a submodule lazily
            else:
                shutil.rmtree(self.root, ignore_errors=True)
            _COPIES.discard(self.root)


_LOCK = threading.Lock()
_COPIES: set[Path] = set()
_LEFT_FOR_EXIT: list[Path] = []


def _imported_from(prefix: str) -> bool:
    for module in list(sys.modules.values()):
        places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
        if any(str(place).startswith(prefix) for place in places):
            return True
    return False


@atexit.register
def _remove_copies() -> None:
    for root in [*_COPIES, *_LEFT_FOR_EXIT]:
        shutil.rmtree(root, ignore_errors=True)


def private_directory() -> Path:
    """A new directory only this user can read or write (0700), checked after it is made."""
    parent = os.environ.get(COPIES_ENV) or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mlflow-dspy-model-", dir=parent))
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        shutil.rmtree(root, ignore_errors=True)
        raise IntegrityError(f"the private directory {root} is not this user's alone", "unsafe_copy")
    return root


def fetch_verified(uri: str, trust: tuple[TrustKey, ...] | None = None) -> PrivateCopy:
    """Download `uri` into a private directory and verify that copy; load only `.path` of what is returned,
    and `release()` it when the model is no longer served."""
    root = private_directory()
    try:
        target = root / "model"
        target.mkdir()
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(target)))
        if not local.resolve().is_relative_to(root.resolve()):  # never the store's own folder
            raise IntegrityError(f"{uri} was not copied into {root} (MLflow returned {local})", "unsafe_copy")
        verified = verify(uri, local, trust)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    with _LOCK:
        _COPIES.add(root)
    return PrivateCopy(uri, root, local, verified)


def download_verified(uri: str, trust: tuple[TrustKey, ...] | None = None) -> str:
    """Download `uri` into a private directory and verify it; the local directory that may now be loaded (kept
    until the process exits)."""
    return str(fetch_verified(uri, trust).path)
