"""What checking a model before loading it costs (`make bench`'s `verify` section), for the qa artifact the bench
logged: the download into a private copy, the manifest check (every file hashed and compared) with the
registry's `model_sha256` lookup (no trust key), and the same check with an Ed25519 signature instead of the
lookup (a trust key). Medians of a few rounds, in a child Python of its own (the bench process never imports
the model).

    python -m bench.verify_cost MODEL_URI   # one JSON line
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.processes import ROOT

ROUNDS = 5


def verify_figures(env: dict[str, str], model_uri: str) -> dict:
    """The figures, measured in a child with the bench store's environment."""
    done = subprocess.run([sys.executable, "-m", "bench.verify_cost", model_uri], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench.verify_cost failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify_line(figures: dict) -> str:
    return (f"verifying the qa artifact ({figures['files']} files, {figures['megabytes']} MB), median of "
            f"{figures['rounds']}: private copy {figures['download_ms']} ms; manifest + registry tag "
            f"{figures['check_ms']} ms; manifest + signature {figures['signed_check_ms']} ms (of which the "
            f"signature {figures['signature_ms']} ms); in all, before anything is loaded: "
            f"{figures['total_ms']} ms unsigned, {figures['total_signed_ms']} ms with a trust key")


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def measure(model_uri: str) -> dict:
    import mlflow
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mlflow_dspy.packaging import integrity, signing
    from mlflow_dspy.packaging.paths import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    key = Ed25519PrivateKey.generate()
    trust = signing.trust_keys_from([signing.inline(key.public_key())])
    download, check, signed, signature = [], [], [], []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
            download.append(time.perf_counter() - began)
            began = time.perf_counter()
            integrity.verify(model_uri, local, ())
            check.append(time.perf_counter() - began)
            body = (local / integrity.MANIFEST).read_bytes()
            document = signing.sign(body, key)
            (local / integrity.SIGNATURE).write_bytes(document)
            began = time.perf_counter()
            signing.check(body, document, trust)
            signature.append(time.perf_counter() - began)
            began = time.perf_counter()
            integrity.verify(model_uri, local, trust)
            signed.append(time.perf_counter() - began)
            sizes = [p.stat().st_size for p in local.rglob("*") if p.is_file()]
    figures = {"rounds": ROUNDS, "files": len(sizes), "megabytes": round(sum(sizes) / 1e6, 2),
               "download_ms": _median_ms(download), "check_ms": _median_ms(check),
               "signed_check_ms": _median_ms(signed), "signature_ms": _median_ms(signature)}
    figures["total_ms"] = round(figures["download_ms"] + figures["check_ms"], 1)
    figures["total_signed_ms"] = round(figures["download_ms"] + figures["signed_check_ms"], 1)
    return figures


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
