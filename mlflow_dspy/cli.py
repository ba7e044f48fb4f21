"""mlflow-dspy: take a DSPy program from a notebook to production.

The command line only; each command's work lives in its own package.
Heavy imports (dspy, mlflow) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from mlflow_dspy.program.problems import UserProblem

PROGRAM_HELP = "an example (qa, ...), a program in your pyproject.toml, package.module:attr or file.py:attr"


def _config(args: argparse.Namespace):
    """The program the command names, with the command line's options on top of its project table."""
    from mlflow_dspy.program.project import resolve_target

    target = args.program_ref or args.program
    if not target:
        raise UsageProblem("name a program: " + PROGRAM_HELP)
    options = {key: getattr(args, key, None) for key in
               ("dev", "train", "metric", "lm", "question_field", "context_field", "answer_field", "requirements")}
    return resolve_target(target).with_options(**options)


def cmd_log(args: argparse.Namespace) -> int:
    from mlflow_dspy.lm_engine.select import configure_dspy
    from mlflow_dspy.packaging.log import log_target
    from mlflow_dspy.program.target import open_target

    config = _config(args)
    target = open_target(config)
    lm = configure_dspy(config.lm)
    logged = log_target(target, lm=lm, registered_model_name=args.name, evaluate_dev=not args.no_eval,
                        signing_key=args.signing_key)
    if args.json:
        _json_line(args, logged.as_dict())
    else:
        print(f"run_id:    {logged.run_id}")
        print(f"model_uri: {logged.model_uri}")
        if logged.version:
            print(f"registered {logged.registered_model} version {logged.version}")
        if logged.dev_score is not None:
            failed = f" ({logged.dev_failed} examples failed and scored 0)" if logged.dev_failed else ""
            print(f"dev score: {logged.dev_score:.1f}{failed}")
        print(f"serve it:  mlflow models serve -m {logged.model_uri} -p 6000 --env-manager local")
    return 0


def _check_model_uri(uri: str) -> None:
    from mlflow_dspy.lifecycle.models import resolve

    resolve(uri)


def _trust(args: argparse.Namespace):
    """The trust keys of --trust-key, else of $MLFLOW_DSPY_TRUST_KEY (read now: a bad key is one line here)."""
    from mlflow_dspy.packaging.signing import trust_keys_from

    return trust_keys_from(args.trust_key)


def cmd_serve(args: argparse.Namespace) -> int:
    from mlflow_dspy.packaging.serve import serve_verified

    trust = _trust(args)
    _check_model_uri(args.model_uri)
    return serve_verified(args.model_uri, args.port, args.host, args.env_manager, trust)


def cmd_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_dspy.packaging.signing import generate, inline, load_signing_key

    private, public = generate(Path(args.out).expanduser())
    print(f"signing key (keep it secret, mode 0600): {private}")
    print(f"trust key (public): {public}")
    print(f"  log with:   mlflow-dspy log PROGRAM --signing-key {private}   (or MLFLOW_DSPY_SIGNING_KEY)")
    print(f"  serve with: mlflow-dspy gateway -m URI --trust-key {public}   (or MLFLOW_DSPY_TRUST_KEY)")
    print(f"  the same trust key in one line: {inline(load_signing_key(private).public_key())}")
    return 0


def _gateway_config(args: argparse.Namespace):
    """The gateway's configuration from the command line, checked before anything loads."""
    from mlflow_dspy.gateway.config import GatewayConfig

    # Each setting from its flag, else its environment variable, else its default, checked against its range.
    config = GatewayConfig.resolve(vars(args))
    config.check()
    from mlflow_dspy.gateway.router import Split

    for text in config.splits:
        Split.parse(text)  # a malformed split is one line here
    from mlflow_dspy.packaging.signing import trust_keys_from

    trust_keys_from(config.trust_keys)  # a trust key that cannot be read is one line here, not a failed load
    for uri in config.model_uris:
        _check_model_uri(uri)  # a mistyped name or version is one line here, not a failed load
    if config.program:
        from mlflow_dspy.program.project import resolve_target
        from mlflow_dspy.program.target import open_target

        open_target(resolve_target(config.program))  # a bad reference is one line here, not a failed start-up
    return config


def cmd_gateway(args: argparse.Namespace) -> int:
    from mlflow_dspy.gateway.server import run_gateway

    return run_gateway(_gateway_config(args))


def cmd_mcp(args: argparse.Namespace) -> int:
    from mlflow_dspy.gateway.mcp import serve_stdio

    with contextlib.redirect_stdout(sys.stderr):  # stdout is the protocol's alone, even while the program loads
        config = _gateway_config(args)
    return serve_stdio(config)


def cmd_eval(args: argparse.Namespace) -> int:
    from mlflow_dspy.lifecycle.eval_command import evaluate_model_uri, evaluate_program

    if args.model_uri:
        if not args.dev:
            raise UsageProblem("eval -m MODEL_URI needs --dev FILE (JSON Lines of the program's fields)")
        from pathlib import Path

        from mlflow_dspy.program.datasets import DataProblem

        dev = Path(args.dev).resolve()
        if not dev.is_file():
            raise DataProblem(f"data file not found: {dev}")  # before the model is fetched and loaded
        trust = _trust(args)
        _check_model_uri(args.model_uri)
        report, run_id = evaluate_model_uri(args.model_uri, dev, args.metric, trust)
    else:
        report, run_id = evaluate_program(_config(args))
    result = {"program": report.program, "dev_score": round(report.score, 2), "examples": len(report.rows),
              "failed": report.failed, "run_id": run_id, "dataset_hash": report.dataset_hash}
    failed = f", {report.failed} failed and scored 0" if report.failed else ""
    if args.json:
        _json_line(args, result)
    else:
        print(f"{report.program}: dev score {report.score:.1f} on {len(report.rows)} examples{failed} (run {run_id})")
    return 0


def cmd_traces_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_dspy.lifecycle.traces_export import export_traces, parse_since

    try:
        parse_since(args.since)
    except ValueError as exc:
        raise UsageProblem(f"traces export: {exc}") from None
    report = export_traces(args.name, Path(args.out), args.version, args.since, args.feedback,
                           progress=not args.json)
    if args.json:
        _json_line(args, report.as_dict())
    else:
        print(f"{report.written} examples -> {report.out} (from {report.rated} rated of {report.traces} traces of "
              f"{args.name}; {report.duplicates} duplicates, {report.without_outputs} rated down with no expected "
              "outputs)")
    return 0


def cmd_improve(args: argparse.Namespace) -> int:
    from mlflow_dspy.lifecycle.improve import NothingToImprove, improve
    from mlflow_dspy.lifecycle.traces_export import parse_since

    if not args.from_traces:
        raise UsageProblem("improve: say where the data comes from: --from-traces (the gateway's rated traces)")
    if not 0 < args.holdout < 1:
        raise UsageProblem(f"improve: --holdout is a fraction between 0 and 1, not {args.holdout}")
    try:
        parse_since(args.since)
    except ValueError as exc:
        raise UsageProblem(f"improve: {exc}") from None
    try:
        done = improve(args.name, args.alias, args.optimizer, args.holdout, args.seed, args.margin, args.metric,
                       args.version, args.since, args.feedback, args.dry_run, args.signing_key)
    except NothingToImprove as nothing:
        print(f"nothing to improve: {nothing}", file=sys.stderr)
        return 1
    if args.json:
        _json_line(args, done.as_dict())
        return 0
    print(("dry run: " if done.dry_run else "") + done.why)
    if done.dry_run:
        print(f"would register a new version of {done.name}"
              + (f" and move @{done.alias} to it" if done.promote else f", and leave @{done.alias} on version "
                 f"{done.champion_version}"))
    elif done.promote:
        print(f"{done.name}@{done.alias} -> version {done.candidate_version} (was {done.champion_version}); run "
              f"{done.run_id}")
    else:
        print(f"registered version {done.candidate_version}; {done.name}@{done.alias} stays on version "
              f"{done.champion_version}; run {done.run_id}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow_dspy.packaging.promote import PromotionRefused, promote

    try:
        done = promote(args.name, args.version, args.alias, args.force, args.reason)
    except PromotionRefused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 1
    before = f"version {done.previous_version} ({done.previous_score})" if done.previous_version else "nobody"
    print(f"{done.name}@{done.alias} -> version {done.version} (dev score {done.score:.2f}); before: {before}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from mlflow_dspy.lifecycle.optimize import optimize

    config = _config(args)
    logged, before = optimize(config, args.optimizer, args.name, args.signing_key)
    result = {**logged.as_dict(), "dev_score_before": round(before, 2)}
    if args.json:
        _json_line(args, result)
    else:
        print(f"{config.name}: dev score {before:.1f} -> {logged.dev_score:.1f}; "
              f"registered {logged.registered_model} version {logged.version} ({logged.model_uri})")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_dspy.lifecycle.starter import write_starter

    folder = Path(args.dir)
    written = write_starter(folder)
    name = next(p for p in written if p.name == "pyproject.toml").parent.name
    print(f"wrote a starter project in {folder.resolve()} ({len(written)} files). Next:")
    print(f"  cd {folder} && mlflow-dspy log {name.lower()}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_dspy.batch.run import run_batch

    report = run_batch(args.model_uri, Path(args.input), Path(args.output), args.engine, args.concurrency,
                       args.master, _trust(args))
    if args.json:
        _json_line(args, report.__dict__)
    else:
        print(f"{report.rows} rows -> {report.output}: computed {report.computed}, skipped {report.skipped} "
              f"already done, {report.failed} failed (see the error column)")
    return 0


def cmd_docker(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_dspy.packaging.docker import build_image, docker_engine_available, generate_model_dockerfile

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


def _program_arguments(command: argparse.ArgumentParser, data: tuple[str, ...] = ("dev",)) -> None:
    command.add_argument("program_ref", nargs="?", metavar="PROGRAM", help=PROGRAM_HELP)
    command.add_argument("--program", help=argparse.SUPPRESS)  # the 0.1 spelling
    command.add_argument("--lm", default=None,
                         help="LM model string, e.g. openai/gpt-4o-mini (default: the project's, else $DSPY_LM, "
                              "else the embedded SmolLM2)")
    for split in data:
        command.add_argument(f"--{split}", default=None, metavar="FILE",
                             help=f"{split} set: JSON Lines keyed by the program's input and output fields")
    command.add_argument("--metric", default=None, metavar="REF",
                         help="module:function or file.py:function, (example, prediction, trace=None) "
                              "(default: every output field matches, trimmed and case-folded)")


def _chat_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--question-field", default=None, help="the input a user's message fills")
    command.add_argument("--context-field", default=None, help="the input system messages fill")
    command.add_argument("--answer-field", default=None, help="the output a chat answer shows")


def _gateway_arguments(command: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The gateway's flags, one per setting of its table (gateway/config.py), or those of the settings named in
    `only`; a flag not given is None, so that its environment variable, else its default, applies."""
    from mlflow_dspy.gateway.config import SETTINGS  # light: the gateway itself is imported when it runs

    kinds = {"int": int, "float": float, "str": str}
    for setting in SETTINGS:
        if not setting.flags or (only is not None and setting.name not in only):
            continue  # the API keys: from the environment only, never on a command line
        options: dict = {"dest": setting.name, "default": None, "help": setting.describe().replace("%", "%%")}
        if setting.kind == "switch":
            options.update(action="store_const", const=not setting.default)
        elif setting.kind == "list":
            options.update(action="append", metavar=setting.metavar)
        else:
            options.update(type=kinds[setting.kind], metavar=setting.metavar)
        command.add_argument(*setting.flags, **options)


def _signing_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--signing-key", default=None, metavar="PEM",
                         help="sign the model's manifest with this Ed25519 private key (mlflow-dspy keys makes one; "
                              "default: $MLFLOW_DSPY_SIGNING_KEY; none: unsigned)")


def _trust_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--trust-key", action="append", default=None, metavar="PUBKEY",
                         help="load only a model whose manifest is signed by this Ed25519 public key (a PEM file or "
                              "ed25519:BASE64; repeatable; default: $MLFLOW_DSPY_TRUST_KEY; none: the manifest is "
                              "still checked)")


def _log_command(commands) -> None:
    log = commands.add_parser("log", help="log a program as an MLflow model and register a version")
    _program_arguments(log)
    _chat_arguments(log)
    log.add_argument("--name", "--registered-model-name", dest="name", default=None,
                     help="registered model name (default: the project's, else dspy-<program>)")
    log.add_argument("--requirements", default=None, metavar="FILE",
                     help="your own pins, added to the runtime's (a conflict is an error)")
    log.add_argument("--no-eval", action="store_true", help="skip scoring the program on its dev set")
    _signing_argument(log)
    log.add_argument("--json", action="store_true",
                     help="end stdout with one JSON line: run_id, model_uri, registered_model, version, dev_score")
    log.set_defaults(func=cmd_log)


def _eval_command(commands) -> None:
    evaluation = commands.add_parser("eval", help="score a logged model (or a program) on a dev set")
    _program_arguments(evaluation)
    evaluation.add_argument("-m", "--model-uri", default=None, help="evaluate this logged model (with its own LM)")
    evaluation.add_argument("--json", action="store_true", help="print one JSON line (dev_score, ...)")
    _trust_argument(evaluation)
    evaluation.set_defaults(func=cmd_eval)


def _optimize_command(commands) -> None:
    optimization = commands.add_parser("optimize", help="compile a program with a DSPy optimizer; log a new version")
    _program_arguments(optimization, data=("train", "dev"))
    _chat_arguments(optimization)
    optimization.add_argument("--optimizer", default="bootstrap", choices=["bootstrap", "mipro"])
    optimization.add_argument("--name", "--registered-model-name", dest="name", default=None,
                              help="registered model name (default: the project's, else dspy-<program>)")
    optimization.add_argument("--json", action="store_true", help="print one JSON line")
    _signing_argument(optimization)
    optimization.set_defaults(func=cmd_optimize)


def _init_command(commands) -> None:
    init = commands.add_parser("init", help="write a starter project (a program, data, a metric) that logs as is")
    init.add_argument("dir", nargs="?", default=".", help="the project folder (default: here)")
    init.set_defaults(func=cmd_init)


def _promote_command(commands) -> None:
    promotion = commands.add_parser("promote", help="point an alias at a version that scores at least as well")
    promotion.add_argument("--name", required=True, help="registered model name, e.g. dspy-qa")
    promotion.add_argument("--version", required=True)
    promotion.add_argument("--alias", default="champion")
    promotion.add_argument("--force", action="store_true", help="move the alias even to a lower-scoring version")
    promotion.add_argument("--reason", default=None, help="why, recorded on the version")
    promotion.set_defaults(func=cmd_promote)


def _batch_command(commands) -> None:
    batch = commands.add_parser("batch", help="score a file of chats or questions with a logged model")
    batch.add_argument("-m", "--model-uri", required=True)
    batch.add_argument("--input", required=True, help="parquet, csv or jsonl: a 'messages' or 'question' column")
    batch.add_argument("--output", required=True, help="parquet, csv or jsonl; re-running resumes it")
    batch.add_argument("--engine", default="pandas", choices=["pandas", "spark"])
    batch.add_argument("--concurrency", type=int, default=8, help="rows in flight (per Spark task)")
    batch.add_argument("--master", default="local[*]", help="Spark master URL (with --engine spark)")
    batch.add_argument("--json", action="store_true", help="print one JSON line")
    _trust_argument(batch)
    batch.set_defaults(func=cmd_batch)


def _docker_command(commands) -> None:
    docker = commands.add_parser("docker", help="Dockerfiles for a logged model and the gateway; build if possible")
    docker.add_argument("-m", "--model-uri", required=True)
    docker.add_argument("--out", default="build/docker", help="where the model's Dockerfile and files go")
    docker.add_argument("--tag", default="dspy-model", help="image tag for the model image")
    docker.set_defaults(func=cmd_docker)


def _serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="`mlflow models serve` a private copy of a logged model, checked "
                                              "against its manifest (and signature) first")
    serve.add_argument("-m", "--model-uri", required=True)
    serve.add_argument("-p", "--port", type=int, default=6000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"])
    _trust_argument(serve)
    serve.set_defaults(func=cmd_serve)


def _improve_command(commands) -> None:
    improvement = commands.add_parser(
        "improve", help="optimize the champion on its rated traces; promote the result only if it wins")
    improvement.add_argument("name", help="the registered model (dspy-qa)")
    improvement.add_argument("--from-traces", action="store_true", help="the data: the gateway's rated traces")
    improvement.add_argument("--alias", default="champion", help="the alias to improve on and promote to")
    improvement.add_argument("--optimizer", default="bootstrap", choices=["bootstrap", "mipro"])
    improvement.add_argument("--holdout", type=float, default=0.3,
                             help="the fraction held out to judge champion and candidate (default: %(default)s)")
    improvement.add_argument("--seed", type=int, default=0, help="the split's shuffle (default: %(default)s)")
    improvement.add_argument("--margin", type=float, default=0.0,
                             help="points (of 100) the candidate must win by on the held-out set; default 0: any "
                                  "strict improvement, a tie keeps the champion")
    improvement.add_argument("--metric", default=None, help="module:function or file.py:function (default: the "
                                                            "champion's)")
    improvement.add_argument("--version", default=None, help="only traces this version answered")
    improvement.add_argument("--since", default=None, help="only traces from this date or time on")
    improvement.add_argument("--feedback", default="any", choices=["positive", "negative", "expected", "any"])
    improvement.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
    improvement.add_argument("--json", action="store_true", help="print one JSON line")
    _signing_argument(improvement)
    improvement.set_defaults(func=cmd_improve)


def _traces_command(commands) -> None:
    traces = commands.add_parser("traces", help="the gateway's traces: export the rated ones as examples")
    traces_commands = traces.add_subparsers(dest="traces_command", required=True)
    export = traces_commands.add_parser(
        "export", help="rated traces as JSON Lines examples (the format --dev and --train read)")
    export.add_argument("name", help="the registered model (dspy-qa), as the gateway served it")
    export.add_argument("--version", default=None, help="only the traces this version answered")
    export.add_argument("--since", default=None, help="only traces from this date or time on (ISO, UTC by default)")
    export.add_argument("--feedback", default="any", choices=["positive", "negative", "expected", "any"],
                        help="which rated traces: rated up, rated down, with expected outputs, or any (default)")
    export.add_argument("--out", required=True, help="the JSON Lines file to write")
    export.add_argument("--json", action="store_true", help="print one JSON line (counts), no progress bar")
    export.set_defaults(func=cmd_traces_export)


def _gateway_command(commands) -> None:
    gateway = commands.add_parser(
        "gateway", help="serve a logged model (or a program) with the OpenAI API",
        epilog="Every flag has an environment variable, named in its help: MLFLOW_DSPY_ and the flag in capitals, "
               "dashes as underscores (a --no-X switch: MLFLOW_DSPY_X=0). A flag wins over its variable. "
               "API keys come only from GATEWAY_API_KEYS.")
    _gateway_arguments(gateway)
    gateway.set_defaults(func=cmd_gateway)


# The gateway's settings that mean something without HTTP (`mcp` serves over stdin and stdout).
MCP_SETTINGS = ("model_uris", "splits", "program", "lm", "served_name", "reload_interval", "max_in_flight",
                "max_messages", "max_characters", "request_timeout", "traces", "trace_sample", "trace_flush_timeout",
                "trace_queue", "embedded_parallel", "embedded_cache_mb", "embedded_queue", "embedded_threads",
                "speedups", "trust_keys")


def _keys_command(commands) -> None:
    keys = commands.add_parser("keys", help="make an Ed25519 key pair: sign models with one, trust them with the "
                                            "other")
    keys.add_argument("--out", default="~/.config/mlflow-dspy/keys",
                      help="the folder for signing.pem and trust.pem, outside any project so the private key is "
                           "never committed (default: %(default)s)")
    keys.set_defaults(func=cmd_keys)


def _mcp_command(commands) -> None:
    mcp = commands.add_parser(
        "mcp", help="serve a logged model (or a program) as MCP tools over stdio, for desktop agent hosts",
        description="Each served name is an MCP tool: /predict's input fields in, the typed outputs out. stdout "
                    "carries the protocol alone; logs go to stderr. (The gateway serves the same tools over "
                    "HTTP at /mcp.)",
        epilog="Every flag has an environment variable, as for `mlflow-dspy gateway`.")
    _gateway_arguments(mcp, MCP_SETTINGS)
    mcp.set_defaults(func=cmd_mcp)


# Each command's parser, in the order --help lists them.
COMMANDS = (
    _log_command, _eval_command, _optimize_command, _init_command, _promote_command, _batch_command, _docker_command,
    _serve_command, _improve_command, _traces_command, _gateway_command, _mcp_command, _keys_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlflow-dspy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


class UsageProblem(UserProblem):
    """A command line that asks for something impossible (a missing or contradictory option)."""


def _not_found(exc: Exception) -> bool:
    """MLflow's answer to a model, version, alias or run that does not exist."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _json_line(args: argparse.Namespace, payload: dict) -> None:
    """A command's one JSON line, on the real stdout (everything else a --json command writes goes to stderr)."""
    print(json.dumps(payload), file=args.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.stdout = sys.stdout
    try:
        # With --json, stdout is the JSON line alone: progress bars and libraries' prints go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext():
            return args.func(args)
    except Exception as exc:
        from mlflow_dspy.packaging.integrity import IntegrityError

        # A refused model is an answer, not a crash: one clear line, no stack trace.
        if isinstance(exc, IntegrityError):
            print(f"refused: {exc}", file=sys.stderr)
            return 3
        if isinstance(exc, UserProblem) or _not_found(exc):
            print(f"mlflow-dspy {args.command}: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ImportError) and getattr(args, "command", "") in ("log", "eval", "optimize", "gateway",
                                                                              "mcp"):
            print(f"mlflow-dspy {args.command}: importing the program failed: {exc}", file=sys.stderr)
            return 2
        raise
