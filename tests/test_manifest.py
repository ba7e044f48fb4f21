"""The manifest of a model's files and its Ed25519 signature (packaging/integrity.py, packaging/signing.py), in
this process on folders of files: what is listed, what a check refuses and why, private copies, keys."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mlflow_dspy.gateway.config import BY_NAME
from mlflow_dspy.packaging import integrity, signing
from mlflow_dspy.packaging.integrity import MANIFEST, SIGNATURE, IntegrityError, verify, write_manifest
from mlflow_dspy.packaging.signing import TRUST_KEY_ENV, KeyProblem, trust_keys_from
from tests.support.cli import cli_in_process


def model_folder(root):
    """A folder shaped like a logged model: whatever files the flavor wrote, nested, plus MLflow's meta file."""
    (root / "code" / "pkg").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "code" / "pkg" / "__init__.py").write_text("X = 1\n")
    (root / "data" / "model.pkl").write_bytes(b"\x80\x04pickle")
    (root / "data" / "state.json").write_text("{}")
    (root / "requirements.txt").write_text("dspy==3.4.1\n")
    (root / "registered_model_meta").write_text("model_name: x\n")
    return root


def trust_of(key: Ed25519PrivateKey) -> tuple[signing.TrustKey, ...]:
    return trust_keys_from([signing.inline(key.public_key())])


@pytest.fixture
def no_trust_env(monkeypatch):
    monkeypatch.delenv(TRUST_KEY_ENV, raising=False)


def test_the_manifest_lists_every_file_but_itself_its_signature_and_mlflows_meta_file(tmp_path):
    root = model_folder(tmp_path)
    write_manifest(root, Ed25519PrivateKey.generate())
    listed = json.loads((root / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["MLmodel", "code/pkg/__init__.py", "data/model.pkl", "data/state.json",
                              "requirements.txt"]
    assert (root / SIGNATURE).is_file()
    assert verify(str(root), root, ()).manifest


@pytest.mark.parametrize("change", ["changed", "added", "missing"])
def test_a_file_changed_added_or_missing_is_refused_by_name(tmp_path, no_trust_env, change):
    root = model_folder(tmp_path)
    write_manifest(root)
    if change == "changed":
        (root / "data" / "model.pkl").write_bytes(b"\x80\x04evil")
        named = "data/model.pkl"
    elif change == "added":  # code/ goes first on sys.path: a new module there would shadow any other
        (root / "code" / "json.py").write_text("raise SystemExit")
        named = "code/json.py"
    else:
        (root / "data" / "state.json").unlink()
        named = "data/state.json"
    with pytest.raises(IntegrityError, match=f"{change}: {named}") as refused:
        verify(str(root), root, ())
    assert refused.value.reason == "tampered"


def test_a_symbolic_link_in_a_model_is_refused(tmp_path):
    root = model_folder(tmp_path)
    write_manifest(root)
    (root / "data" / "model.pkl").unlink()
    (root / "data" / "model.pkl").symlink_to(tmp_path / "MLmodel")
    with pytest.raises(IntegrityError, match="symbolic link"):
        verify(str(root), root, ())


def test_under_a_trust_key_only_a_manifest_signed_by_it_is_accepted(tmp_path):
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = trust_of(ours)
    root = model_folder(tmp_path / "model")
    write_manifest(root, ours)
    assert verify(str(root), root, trust).signed_by == signing.key_id(ours.public_key())

    write_manifest(root)  # unsigned
    with pytest.raises(IntegrityError, match="not signed") as unsigned:
        verify(str(root), root, trust)
    assert unsigned.value.reason == "unsigned"

    write_manifest(root, theirs)
    with pytest.raises(IntegrityError, match="not a trust key here") as untrusted:
        verify(str(root), root, trust)
    assert untrusted.value.reason == "untrusted_key"

    # The pickle edited and the manifest rewritten to match it, the signature kept: the signature fails.
    write_manifest(root, ours)
    signature = (root / SIGNATURE).read_bytes()
    (root / "data" / "model.pkl").write_bytes(b"\x80\x04evil")
    write_manifest(root)
    (root / SIGNATURE).write_bytes(signature)
    with pytest.raises(IntegrityError, match="does not match the manifest") as forged:
        verify(str(root), root, trust)
    assert forged.value.reason == "bad_signature"


def test_without_a_manifest_a_trust_key_refuses_and_no_key_falls_back_to_the_digest_tag(tmp_path, monkeypatch):
    root = model_folder(tmp_path)
    with pytest.raises(IntegrityError, match=r"no manifest\.json") as refused:
        verify(str(root), root, trust_of(Ed25519PrivateKey.generate()))
    assert refused.value.reason == "unsigned"
    monkeypatch.delenv(integrity.ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(IntegrityError, match="no recorded model_sha256") as unverified:
        verify(str(root), root, ())
    assert unverified.value.reason == "unverified"
    monkeypatch.setattr(integrity, "recorded_digest", lambda uri: integrity.digest(root))
    assert not verify(str(root), root, ()).manifest  # an older model: its tag, with a warning
    monkeypatch.setenv(integrity.ALLOW_UNVERIFIED_ENV, "1")
    with pytest.raises(IntegrityError, match=r"unsigned|no manifest"):  # never under a trust key
        verify(str(root), root, trust_of(Ed25519PrivateKey.generate()))


def test_signing_after_logging_leaves_the_recorded_digest_as_it_was(tmp_path):
    root = model_folder(tmp_path)
    write_manifest(root)
    before = integrity.digest(root)
    (root / SIGNATURE).write_bytes(signing.sign((root / MANIFEST).read_bytes(), Ed25519PrivateKey.generate()))
    assert integrity.digest(root) == before


def test_a_private_copy_is_this_users_alone_and_goes_with_its_code_on_release(tmp_path, monkeypatch):
    monkeypatch.setenv(integrity.COPIES_ENV, str(tmp_path / "copies"))
    source = model_folder(tmp_path / "model")
    write_manifest(source)
    copy = integrity.fetch_verified(str(source), ())
    assert copy.root.parent == tmp_path / "copies" and stat.S_IMODE(copy.root.stat().st_mode) == 0o700
    assert copy.path != source and (copy.path / "data" / "model.pkl").read_bytes() == b"\x80\x04pickle"
    sys.path.insert(0, str(copy.path / "code"))  # as MLflow's loader puts it
    copy.release()
    assert str(copy.path / "code") not in sys.path
    assert not copy.root.exists()


def test_a_failed_check_leaves_no_copy_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(integrity.COPIES_ENV, str(tmp_path / "copies"))
    source = model_folder(tmp_path / "model")
    write_manifest(source)
    (source / "data" / "model.pkl").write_bytes(b"changed")
    with pytest.raises(IntegrityError):
        integrity.fetch_verified(str(source), ())
    assert list((tmp_path / "copies").iterdir()) == []


def test_keys_writes_a_private_signing_key_and_its_trust_key(tmp_path):
    made = cli_in_process("keys", "--out", str(tmp_path / "keys"), env=dict(os.environ))
    assert made.code == 0, made.err
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "trust.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_signing_key(private)
    inline = next(line.split()[-1] for line in made.out.splitlines() if "ed25519:" in line)
    assert trust_keys_from([str(public)])[0].key_id == trust_keys_from([inline])[0].key_id == \
        signing.key_id(key.public_key())
    again = cli_in_process("keys", "--out", str(tmp_path / "keys"), env=dict(os.environ))
    assert again.code == 2 and "never overwritten" in again.err  # a key is never replaced


def test_an_unreadable_trust_key_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "bad.pem").write_text("not a key")
    for spec, said in ((str(tmp_path / "missing.pem"), "not found"), (str(tmp_path / "bad.pem"), "not a PEM"),
                       ("ed25519:abc", "base64")):
        with pytest.raises(KeyProblem, match=said):
            trust_keys_from([spec])
    monkeypatch.setenv(TRUST_KEY_ENV, str(tmp_path / "missing.pem"))
    ran = cli_in_process("gateway", "-m", "models:/x/1", env=dict(os.environ))
    assert ran.code == 2 and "trust key not found" in ran.err and "Traceback" not in ran.err


def test_the_gateways_trust_key_variable_is_the_one_every_command_reads():
    assert BY_NAME["trust_keys"].env == TRUST_KEY_ENV
