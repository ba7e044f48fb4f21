"""mlflow-dspy: take a DSPy program from a notebook to production.

The command line only; each command's work lives in its own package.
Heavy imports (dspy, mlflow) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_log(args: argparse.Namespace) -> int:
    from lm_engine.select import configure_dspy
    from packager.log import log_program

    lm = configure_dspy(args.lm)
    logged = log_program(args.program, lm=lm, registered_model_name=args.registered_model_name,
                         evaluate_dev=not args.no_eval)
    if args.json:
        print(json.dumps(logged.as_dict()), flush=True)
    else:
        print(f"run_id:    {logged.run_id}")
        print(f"model_uri: {logged.model_uri}")
        if logged.version:
            print(f"registered {logged.registered_model} version {logged.version}")
        if logged.dev_score is not None:
            print(f"dev score: {logged.dev_score:.1f}")
        print(f"serve it:  mlflow models serve -m {logged.model_uri} -p 6000 --env-manager local")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from packager.serve import serve_verified

    return serve_verified(args.model_uri, args.port, args.host, args.env_manager)


def cmd_gateway(args: argparse.Namespace) -> int:
    from serving.run import run_gateway

    if bool(args.model_uri) == bool(args.program):
        print("gateway: give exactly one of -m MODEL_URI or --program NAME", file=sys.stderr)
        return 2
    return run_gateway(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from lifecycle.eval_command import evaluate_model_uri, evaluate_program

    if args.model_uri:
        report, run_id = evaluate_model_uri(args.model_uri)
    else:
        report, run_id = evaluate_program(args.program, args.lm)
    result = {"program": report.program, "dev_score": round(report.score, 2), "examples": len(report.rows),
              "run_id": run_id, "dataset_hash": report.dataset_hash}
    print(json.dumps(result) if args.json else f"{report.program}: dev score {report.score:.1f} "
          f"on {len(report.rows)} examples (run {run_id})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from lifecycle.promote import PromotionRefused, promote

    try:
        done = promote(args.name, args.version, args.alias, args.force, args.reason)
    except PromotionRefused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 1
    before = f"version {done.previous_version} ({done.previous_score})" if done.previous_version else "nobody"
    print(f"{done.name}@{done.alias} -> version {done.version} (dev score {done.score:.2f}); before: {before}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from lifecycle.optimize import optimize

    logged, before = optimize(args.program, args.optimizer, args.lm, args.registered_model_name)
    result = {**logged.as_dict(), "dev_score_before": round(before, 2)}
    print(json.dumps(result) if args.json else
          f"{args.program}: dev score {before:.1f} -> {logged.dev_score:.1f}; "
          f"registered {logged.registered_model} version {logged.version} ({logged.model_uri})")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batch.run import run_batch

    report = run_batch(args.model_uri, Path(args.input), Path(args.output), args.engine, args.concurrency,
                       args.master)
    print(json.dumps(report.__dict__) if args.json else
          f"{report.rows} rows -> {report.output}: computed {report.computed}, skipped {report.skipped} "
          f"already done, {report.failed} failed (see the error column)")
    return 0


def cmd_docker(args: argparse.Namespace) -> int:
    from pathlib import Path

    from packager.docker import build_image, docker_engine_available, generate_model_dockerfile

    dockerfile = generate_model_dockerfile(args.model_uri, Path(args.out))
    print(f"model image: {dockerfile} (serves /invocations like mlflow models serve)")
    print("gateway image: deploy/Dockerfile.gateway (serves the OpenAI API; deploy/k8s runs it)")
    if not docker_engine_available():
        print("no Docker engine on this machine: nothing built. Where one runs:\n"
              f"  docker build -t {args.tag} {dockerfile.parent}\n"
              "  docker build -f deploy/Dockerfile.gateway -t dspy-gateway .")
        return 0
    build_image(dockerfile.parent, args.tag)
    build_image(Path("."), "dspy-gateway", Path("deploy/Dockerfile.gateway"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from programs import REGISTRY

    parser = argparse.ArgumentParser(prog="mlflow_dspy.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    log = commands.add_parser("log", help="log a program as an MLflow model and register a version")
    log.add_argument("--program", default="qa", choices=sorted(REGISTRY), help="program to log (default: qa)")
    log.add_argument(
        "--lm",
        default=None,
        help="LM model string, e.g. openai/gpt-4o-mini (default: $DSPY_LM, else the embedded SmolLM2)",
    )
    log.add_argument("--registered-model-name", default=None, help="registry name (default: dspy-<program>)")
    log.add_argument("--no-eval", action="store_true", help="skip scoring the program on its dev set")
    log.add_argument("--json", action="store_true", help="end stdout with one JSON line: run_id, model_uri, ...")
    log.set_defaults(func=cmd_log)

    evaluation = commands.add_parser("eval", help="score a program or a logged model on its dev set")
    evaluation.add_argument("--program", default="qa", choices=sorted(REGISTRY))
    evaluation.add_argument("--model-uri", default=None, help="evaluate this logged model instead (its own LM)")
    evaluation.add_argument("--lm", default=None, help="without --model-uri: the LM (default: $DSPY_LM, else embedded)")
    evaluation.add_argument("--json", action="store_true", help="print one JSON line")
    evaluation.set_defaults(func=cmd_eval)

    optimization = commands.add_parser("optimize", help="compile a program with a DSPy optimizer; log a new version")
    optimization.add_argument("--program", default="qa", choices=sorted(REGISTRY))
    optimization.add_argument("--optimizer", default="bootstrap", choices=["bootstrap", "mipro"])
    optimization.add_argument("--lm", default=None, help="the LM (default: $DSPY_LM, else the embedded SmolLM2)")
    optimization.add_argument("--registered-model-name", default=None, help="registry name (default: dspy-<program>)")
    optimization.add_argument("--json", action="store_true", help="print one JSON line")
    optimization.set_defaults(func=cmd_optimize)

    promotion = commands.add_parser("promote", help="point an alias at a version that scores at least as well")
    promotion.add_argument("--name", required=True, help="registered model name, e.g. dspy-qa")
    promotion.add_argument("--version", required=True)
    promotion.add_argument("--alias", default="champion")
    promotion.add_argument("--force", action="store_true", help="move the alias even to a lower-scoring version")
    promotion.add_argument("--reason", default=None, help="why, recorded on the version")
    promotion.set_defaults(func=cmd_promote)

    batch = commands.add_parser("batch", help="score a file of chats or questions with a logged model")
    batch.add_argument("-m", "--model-uri", required=True)
    batch.add_argument("--input", required=True, help="parquet, csv or jsonl: a 'messages' or 'question' column")
    batch.add_argument("--output", required=True, help="parquet, csv or jsonl; re-running resumes it")
    batch.add_argument("--engine", default="pandas", choices=["pandas", "spark"])
    batch.add_argument("--concurrency", type=int, default=8, help="rows in flight (per Spark task)")
    batch.add_argument("--master", default="local[*]", help="Spark master URL (with --engine spark)")
    batch.add_argument("--json", action="store_true", help="print one JSON line")
    batch.set_defaults(func=cmd_batch)

    docker = commands.add_parser("docker", help="Dockerfiles for a logged model and the gateway; build if possible")
    docker.add_argument("-m", "--model-uri", required=True)
    docker.add_argument("--out", default="build/docker", help="where the model's Dockerfile and files go")
    docker.add_argument("--tag", default="dspy-model", help="image tag for the model image")
    docker.set_defaults(func=cmd_docker)

    serve = commands.add_parser("serve", help="`mlflow models serve` a logged model after checking its SHA-256")
    serve.add_argument("-m", "--model-uri", required=True)
    serve.add_argument("-p", "--port", type=int, default=6000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"])
    serve.set_defaults(func=cmd_serve)

    gateway = commands.add_parser("gateway", help="serve a logged model (or a program) with the OpenAI API")
    gateway.add_argument(
        "-m", "--model-uri", help="runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>"
    )
    gateway.add_argument("--program", choices=sorted(REGISTRY), help="serve a program from programs/ directly")
    gateway.add_argument("--lm", default=None, help="with --program: the LM (default: $DSPY_LM, else embedded)")
    gateway.add_argument("--name", default=None, help="model name clients send and /v1/models lists")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    gateway.add_argument("--max-in-flight", type=int, default=64,
                         help="requests running at once per worker; more get 429 (default: 64)")
    gateway.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default: 1 MiB)")
    gateway.add_argument("--max-messages", type=int, default=200, help="more messages get 400 (default: 200)")
    gateway.add_argument("--max-characters", type=int, default=50_000,
                         help="more characters of message text get 400 (default: 50000)")
    gateway.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                         help="let browser pages from ORIGIN call the gateway (CORS; off by default; repeatable)")
    gateway.add_argument("--request-timeout", type=float, default=120.0,
                         help="seconds a program may run before 504 (default: 120)")
    gateway.add_argument("--no-traces", action="store_true",
                         help="do not record an MLflow trace per request (default: record them)")
    gateway.set_defaults(func=cmd_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from packager.integrity import IntegrityError  # loaded already if it is one

        # A refused model is an answer, not a crash: one clear line, no stack trace.
        if not isinstance(exc, IntegrityError):
            raise
        print(f"refused: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
