"""The trust chain around a served model, against a real file store (a copy of the shared registry: qa versions
1-3 on the stub, logged unsigned) with a version logged here with a signing key, and real processes where a user
meets them: a model is verified on a private copy and only that copy runs (the swap attack); a signature, not a
registry tag, is the trust root (the tag-only attack); an unsigned or wrongly signed version stays out of
traffic on a hot reload while the old one serves."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dspy.packaging import integrity, signing
from mlflow_dspy.packaging.integrity import DIGEST_TAG, MANIFEST, SIGNATURE
from tests.support.cli import cli_in_process, environment, last_json, run_cli
from tests.support.processes import ROOT, child_env, free_port, gateway_process, running
from tests.support.registry import Registry

NAME = "dspy-qa"
ASK = {"model": NAME, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


class Payload:
    """What an attacker puts in place of the pickle: unpickling it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('the swapped pickle ran')",)


def model_folders(store: Registry, version: str) -> list[Path]:
    """Every folder of the store that holds `version`'s model files: the logged model's, and the run's copy."""
    client = MlflowClient(store.uri)
    found = client.get_model_version(NAME, version)
    folders = [Path(urlparse(client.get_model_version_download_uri(NAME, version)).path),
               Path(urlparse(client.get_run(found.run_id).info.artifact_uri).path) / "model"]
    assert all((folder / "MLmodel").is_file() for folder in folders), folders
    return folders


def sign_in_store(store: Registry, version: str, key) -> None:
    """Sign a version already logged (as a CI job would after review): manifest.sig beside its manifest."""
    for folder in model_folders(store, version):
        (folder / SIGNATURE).write_bytes(signing.sign((folder / MANIFEST).read_bytes(), key))


def plant(store: Registry, version: str, marker: Path, rewrite_manifest: bool = False) -> None:
    """The attacker's edit: the pickle replaced by one that writes `marker` when unpickled; with
    `rewrite_manifest`, the manifest rewritten to match and the `model_sha256` tags set to the new digest (what
    anyone who can write both stores of an `mlflow server` without auth can do)."""
    evil = pickle.dumps(Payload(marker))
    for folder in model_folders(store, version):
        (folder / "data" / "model.pkl").write_bytes(evil)
        if rewrite_manifest:
            (folder / MANIFEST).write_bytes(integrity.manifest_bytes(folder))
    if rewrite_manifest:
        client = MlflowClient(store.uri)
        forged = integrity.digest(model_folders(store, version)[0])
        client.set_model_version_tag(NAME, version, DIGEST_TAG, forged)
        client.set_tag(client.get_model_version(NAME, version).run_id, DIGEST_TAG, forged)


@pytest.fixture(scope="module")
def signed(registry, stub, tmp_path_factory):
    """A copy of the shared registry with version 4 logged here with a signing key (`log --signing-key`), version
    3 signed afterwards with the same key, and version 2 signed by someone else's key; versions 1-3 unsigned as
    logged. Returns (store, its environment, the trust key's PEM path)."""
    tmp = tmp_path_factory.mktemp("signed")
    store = registry.copy(tmp / "store")
    ours, _ = signing.generate(tmp / "ours")
    theirs, _ = signing.generate(tmp / "theirs")
    env = store.env(DSPY_LM="openai/stub-echo", DSPY_LM_API_BASE=stub, OPENAI_API_KEY="sk-stub")
    # In a child, as the shared registry was logged: logging configures dspy.settings for the process it runs in.
    logged = last_json(run_cli("log", "qa", "--no-eval", "--signing-key", str(ours), "--json", env=env, timeout=600))
    assert logged["version"] == "4"
    sign_in_store(store, "3", signing.load_signing_key(ours))
    sign_in_store(store, "2", signing.load_signing_key(theirs))
    return store, env, tmp / "ours" / "trust.pem"


def fresh(signed, tmp_path: Path) -> tuple[Registry, dict[str, str]]:
    """A copy of `signed` of this test's own, to tamper with."""
    store, env, _ = signed
    copy = store.copy(tmp_path / "store")
    return copy, {**env, "MLFLOW_TRACKING_URI": copy.uri}


def test_log_with_a_signing_key_writes_a_signed_manifest_of_every_file(signed, tmp_path):
    store, _, trust = signed
    for folder in model_folders(store, "4"):
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(listed) == on_disk - integrity.UNLISTED  # every file the flavor wrote, whatever its name
        assert {"MLmodel", "data/model.pkl", "requirements.txt"} <= set(listed)
        keys = signing.trust_keys_from([str(trust)])
        assert signing.check((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes(), keys)
    tags = MlflowClient(store.uri).get_model_version(NAME, "4").tags
    assert tags[integrity.SIGNED_BY_TAG] == signing.trust_keys_from([str(trust)])[0].key_id
    assert tags[DIGEST_TAG] == integrity.digest(model_folders(store, "4")[0])


# A gateway whose check is followed at once by the attacker's swap: the real CLI, with `integrity.verify`
# wrapped so that the store's files change the moment it returns (the watcher of the issue, winning every race),
# and the sys.path the program was loaded with printed.
SWAPPING_GATEWAY = """
import json, os, sys
from pathlib import Path
from mlflow_dspy.packaging import integrity, load
from mlflow_dspy.cli import main

verify, load_chat_model = integrity.verify, load.load_chat_model

def verify_then_swap(*args, **kwargs):
    verified = verify(*args, **kwargs)
    for folder in json.loads(os.environ["SWAP_FOLDERS"]):
        Path(folder, "data", "model.pkl").write_bytes(Path(os.environ["SWAP_PICKLE"]).read_bytes())
        Path(folder, "code", "swap_probe_module.py").write_text("PLANTED = True\\n")
    print("swapped after verification", file=sys.stderr, flush=True)
    return verified

def loaded(*args, **kwargs):
    answer = load_chat_model(*args, **kwargs)
    print("SYS_PATH " + json.dumps(sys.path), file=sys.stderr, flush=True)
    return answer

integrity.verify, load.load_chat_model = verify_then_swap, loaded
sys.exit(main(sys.argv[1:]))
"""


def test_a_file_swapped_in_the_store_after_verification_changes_nothing_that_runs(signed, tmp_path):
    """The swap attack: a gateway process on a file store, the store's pickle replaced (and a module dropped into
    its code/) the moment the check passes, before the model is loaded. The gateway loads its private copy: the
    swapped pickle never runs, the store's code/ is not on sys.path, and the version answers."""
    store, env = fresh(signed, tmp_path)
    marker, evil = tmp_path / "ran", tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Payload(marker)))
    folders = [str(folder) for folder in model_folders(store, "1")]
    args = [sys.executable, "-c", SWAPPING_GATEWAY, "gateway", "-m", f"models:/{NAME}/1", "--no-traces",
            "--port", str(port := free_port())]
    log = tmp_path / "gateway.log"
    with running(args, f"http://127.0.0.1:{port}/health", child_env(**env, SWAP_FOLDERS=json.dumps(folders),
                                                                     SWAP_PICKLE=str(evil)), log):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/ready").status_code != 200 and "failed" not in httpx.get(f"{base}/ready").text \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK["messages"]}, timeout=60)
        text = log.read_text()
    assert "swapped after verification" in text
    assert not marker.exists(), "the pickle swapped into the store after the check was unpickled"
    assert answer.status_code == 200, answer.text + text[-3000:]
    assert answer.json()["system_fingerprint"] == f"{NAME}/1"
    assert (Path(folders[0]) / "code" / "swap_probe_module.py").is_file()  # the store does hold the swap
    served_path = json.loads(next(line for line in text.splitlines() if line.startswith("SYS_PATH "))[9:])
    assert not [entry for entry in served_path if str(entry).startswith(str(store.root))]  # not the store's code/
    copies = [entry for entry in served_path if "mlflow-dspy-model-" in str(entry)]
    assert len(copies) == 1 and copies[0].endswith("/code")


def test_serve_hands_mlflow_the_copy_it_verified_while_the_store_changes_under_it(signed, tmp_path):
    """`mlflow-dspy serve` as a user runs it, with the swap made the moment it says it verified the model: the
    `mlflow models serve` it starts loads the private copy, answers /invocations, and the copy is removed when it
    stops."""
    store, env = fresh(signed, tmp_path)
    marker, log = tmp_path / "ran", tmp_path / "serve.log"
    port = free_port()
    args = [sys.executable, "mlflow_dspy.py", "serve", "-m", f"models:/{NAME}/1", "-p", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=child_env(**env, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="300"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "verified " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        plant(store, "1", marker)  # the store's pickle, replaced as soon as the check is over
        said = next(line for line in log.read_text().splitlines() if line.startswith("verified "))
        copy = Path(said.rsplit(" ", 1)[-1])
        assert not copy.is_relative_to(store.root) and os.stat(copy.parent).st_mode & 0o077 == 0
        answer = None
        while proc.poll() is None and time.monotonic() < deadline + 180:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                                    json={"messages": ASK["messages"]})
                break
            time.sleep(0.3)
        assert answer is not None and answer.status_code == 200, log.read_text()[-3000:]
        assert "choices" in answer.json()
        assert not marker.exists(), "the pickle swapped into the store was unpickled by mlflow models serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    assert not copy.parent.exists()  # removed once mlflow models serve stopped


def test_the_tag_only_attack_is_refused_with_a_trust_key(signed, tmp_path, monkeypatch):
    """The pickle edited, the manifest rewritten to match and the `model_sha256` tags set to the new digest: the
    registry's record agrees with the files. Without a trust key nothing can tell (the README says so); with one,
    serve, batch and eval -m refuse it before anything is unpickled, and so does a version with no signature."""
    store, env = fresh(signed, tmp_path)
    _, _, trust = signed
    marker = tmp_path / "ran"
    plant(store, "4", marker, rewrite_manifest=True)
    plant(store, "1", marker, rewrite_manifest=True)  # unsigned as logged: the attack as it was
    with environment(env):
        for version in ("4", "1"):
            assert integrity.fetch_verified(f"models:/{NAME}/{version}", ()).verified.manifest  # no key: it passes

    def not_started(*args, **kwargs):
        raise AssertionError(f"serve got past the check: {args}")

    monkeypatch.setattr("mlflow_dspy.packaging.serve.run_forwarding_signals", not_started)
    rows, dev = tmp_path / "in.jsonl", tmp_path / "dev.jsonl"
    rows.write_text(json.dumps({"question": "hi"}) + "\n")
    dev.write_text(json.dumps({"question": "hi", "answer": "hi"}) + "\n")
    for version, said in (("4", "does not match the manifest"), ("1", "not signed")):
        uri = f"models:/{NAME}/{version}"
        ran = [cli_in_process("serve", "-m", uri, "--trust-key", str(trust), env=env),
               cli_in_process("batch", "-m", uri, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                              "--trust-key", str(trust), env=env),
               cli_in_process("eval", "-m", uri, "--dev", str(dev), env={**env, "MLFLOW_DSPY_TRUST_KEY": str(trust)})]
        for each in ran:
            assert each.code == 3, each.err[-2000:]
            assert "refused" in each.err and said in each.err and "Traceback" not in each.err
    assert not marker.exists() and not (tmp_path / "out.jsonl").exists()


def test_a_version_not_signed_by_a_trust_key_stays_out_of_traffic_on_a_hot_reload(signed, tmp_path):
    """A gateway with --trust-key follows dspy-qa@champion: an unsigned version (1) and one signed by another key
    (2) are refused, shown on /ready and counted in /metrics while version 4 keeps answering; a version signed by
    the trust key (3) takes over, and version 4's private copy is removed."""
    store, env = fresh(signed, tmp_path)
    _, _, trust = signed
    client = MlflowClient(store.uri)
    client.set_registered_model_alias(NAME, "champion", "4")
    target = ["-m", f"models:/{NAME}@champion", "--trust-key", str(trust), "--reload-interval", "0.3"]
    with gateway_process(target, tmp_path, "--no-traces", **env) as served:
        base = served.url
        assert fingerprint(base) == f"{NAME}/4"
        first_copy = next(line.rsplit(" ", 1)[-1] for line in served.log_text().splitlines()
                          if "verified and loaded from its private copy" in line)
        assert Path(first_copy).is_dir()
        failures = {}
        for version, reason in (("1", "not signed"), ("2", "does not trust")):
            client.set_registered_model_alias(NAME, "champion", version)
            ready = until(base, lambda r, v=version: f"version {v} failed" in r.text)
            failures[version] = ready.json()["failures"][f"{NAME}@champion"]
            assert reason in failures[version] and "version 4 serves" in failures[version], failures
            assert fingerprint(base) == f"{NAME}/4"  # the old version keeps serving
        refusals = {(s.labels["model"], s.labels["reason"]): s.value
                    for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                    for s in f.samples if s.name == "mlflow_dspy_model_refusals_total"}
        assert refusals.keys() == {(NAME, "unsigned"), (NAME, "untrusted_key")}, refusals  # (retried each look)
        client.set_registered_model_alias(NAME, "champion", "3")
        until(base, lambda r: "failures" not in r.json())
        assert fingerprint(base) == f"{NAME}/3"
        assert not Path(first_copy).exists()  # let go once version 3 took over


def fingerprint(base: str) -> str:
    reply = httpx.post(f"{base}/v1/chat/completions", json=ASK, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["system_fingerprint"]


def until(base: str, done, seconds: float = 120) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready = httpx.get(f"{base}/ready", timeout=30)
        if done(ready):
            return ready
        time.sleep(0.2)
    raise TimeoutError(ready.text)
