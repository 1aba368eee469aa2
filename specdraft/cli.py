"""The `specdraft` command line: `run` a job, `validate` one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdraft.pipeline.config import ConfigError, load_job

REPO_JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _job_path(job: str | None) -> Path | None:
    if job is not None:
        return Path(job)
    demo = REPO_JOBS / "demo.yaml"
    return demo if demo.is_file() else None  # the dataclass defaults are the demo job


def _split(args_job: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`specdraft run key=value` without a job file: the first word may be an override."""
    if args_job is not None and "=" in args_job and not Path(args_job).exists():
        return None, [args_job, *overrides]
    return args_job, overrides


def cmd_run(args) -> int:
    from specdraft.pipeline.dag import StageError
    from specdraft.pipeline.job import STAGES, run_job

    job_file, overrides = _split(args.job, args.overrides)
    job = load_job(_job_path(job_file), overrides)
    unknown = set(args.force) - set(STAGES)
    if unknown:
        raise ConfigError(
            [f"--force {s}: no such stage (stages: {', '.join(STAGES)})" for s in sorted(unknown)]
        )
    out = Path(args.out) if args.out else Path("runs") / job.name
    if args.address:
        job.ray.address = args.address
    try:
        run_job(job, out, force=set(args.force), use_ray=False if args.no_ray else None)
    except StageError as err:
        print(f"specdraft: {err}", file=sys.stderr)
        return 1
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    print(f"\n{'draft':<10} {'alpha':>7} {'alpha_greedy':>13} {'spec_alpha':>11} {'tau':>6}")
    for name in ("baseline", "reference", "final"):
        m = metrics[name]
        print(
            f"{name:<10} {m['alpha']:>7.3f} {m['alpha_greedy']:>13.3f} {m['spec_alpha']:>11.3f} {m['tau']:>6.2f}"
        )
    print(f"\nlossless greedy check: {'passed' if metrics['lossless_greedy'] else 'FAILED'}")
    print(f"draft:  {out / 'draft'}\nreport: {out / 'report' / 'index.html'}")
    return 0


def cmd_validate(args) -> int:
    job_file, overrides = _split(args.job, args.overrides)
    job = load_job(_job_path(job_file), overrides)
    print(f"job {job.name!r} is valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdraft", description="Distil draft models for speculative decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (default: the built-in demo)")
    run.add_argument("job", nargs="?", help="job YAML (default: jobs/demo.yaml)")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    run.add_argument("--out", help="run directory (default: runs/<job name>/)")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="re-run STAGE and what depends on it (repeatable)",
    )
    run.add_argument("--address", default="", help="attach to an existing Ray cluster")
    run.add_argument(
        "--no-ray", action="store_true", help="run stages in this process instead of Ray tasks"
    )
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a job without running it")
    val.add_argument("job", nargs="?", help="job YAML (default: jobs/demo.yaml)")
    val.add_argument("overrides", nargs="*", help="section.key=value overrides")
    val.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"specdraft: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
