"""Benchmark of `specdraft eval` on the toy pair: batch 1 vs batch 8, and the speculative speedup.

Builds the toy target and draft (the demo job's `data`, `target` and `draft_init` stages, cached in
--store), then runs the eval command's code (`run_eval`, in this process) on the toy eval split at
each batch size, greedy. Reports, side by side:

- prompts/s of the whole evaluation (pair check, loading, analytic alpha, target-only decoding,
  speculative decoding), and of speculative decoding alone;
- the measured cost ratio c, tau, and the wall-clock speedup of greedy speculative decoding over
  target-only decoding of the same prompts at the same batch size.

    python benchmarks/bench_eval.py                     # trains the toy pair first
    python benchmarks/bench_eval.py --store /tmp/store  # keeps it for the next time

On a 2-core CPU the measurements take about 2 minutes; training the pair adds a few more.

The result goes to benchmarks/results/eval_cpu.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from specdraft.pipeline.commands.eval_pair import EvalRequest, run_eval
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.dag import execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "eval_cpu.json"


def build_toy_pair(store: Path) -> tuple[Path, Path]:
    """The demo job's toy target and draft init (trained once, then reused from the store)."""
    job = load_job(REPO / "specdraft" / "jobs" / "demo.yaml", [])
    stages = [s for s in build_stages(job) if s.name in ("data", "target", "draft_init")]
    results = execute(stages, store, use_ray=False)
    return results["target"].path / "model", results["draft_init"].path / "model"


def measure(target: Path, draft: Path, batch_size: int, args) -> dict:
    req = EvalRequest(
        target=str(target),
        draft=str(draft),
        data="builtin",
        gamma=args.gamma,
        temperature=0.0,
        max_new_tokens=args.max_new_tokens,
        num_prompts=args.num_prompts,
        batch_size=batch_size,
        device="cpu",
    )
    start = time.perf_counter()
    m = run_eval(req)
    wall = time.perf_counter() - start
    n = m["num_prompts"]
    return {
        "batch_size": batch_size,
        "num_prompts": n,
        "eval_seconds": round(wall, 2),
        "eval_prompts_per_second": round(n / wall, 3),
        "spec_prompts_per_second": round(n / m["spec_seconds_greedy"], 3),
        "target_only_prompts_per_second": round(n / m["target_only_seconds"], 3),
        "spec_seconds_greedy": round(m["spec_seconds_greedy"], 2),
        "target_only_seconds": round(m["target_only_seconds"], 2),
        "speedup": round(m["speedup"], 3),
        "speedup_predicted": round(m["speedup_predicted"], 3),
        "cost_ratio": round(m["cost_ratio"], 3),
        "alpha_greedy": round(m["alpha_greedy"], 4),
        "spec_alpha_greedy": round(m["spec_alpha_greedy"], 4),
        "spec_alpha_verified_greedy": round(m["spec_alpha_verified_greedy"], 4),
        "tau_greedy": round(m["tau_greedy"], 3),
        "tau_predicted_greedy": round(m["tau_predicted_greedy"], 3),
        "lossless_greedy": m["lossless_greedy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="artifact store for the toy pair (default: a temp dir)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--num-prompts", type=int, default=96, help="96: the whole toy eval split")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size (median kept)")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()

    host = describe_machine()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    trials: dict[int, list[dict]] = {b: [] for b in batch_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else Path(tmp)
        start = time.perf_counter()
        target, draft = build_toy_pair(store)
        build_seconds = time.perf_counter() - start
        warm_up = argparse.Namespace(**{**vars(args), "num_prompts": 4})
        measure(target, draft, batch_sizes[0], warm_up)  # lazy imports, first-call costs
        for _ in range(args.repeats):  # interleaved: load from elsewhere hits every size alike
            for b in batch_sizes:
                trials[b].append(measure(target, draft, b, args))

    runs = []
    for b in batch_sizes:
        ordered = sorted(trials[b], key=lambda r: r["eval_seconds"])
        run = dict(ordered[len(ordered) // 2])  # the median-time run
        run["eval_seconds_all_repeats"] = [r["eval_seconds"] for r in trials[b]]
        run["speedup_all_repeats"] = [r["speedup"] for r in trials[b]]
        runs.append(run)
    base = runs[0]
    for run in runs:
        for kind in ("eval", "spec"):
            ratio = run[f"{kind}_prompts_per_second"] / base[f"{kind}_prompts_per_second"]
            run[f"{kind}_prompts_per_second_vs_batch_{base['batch_size']}"] = round(ratio, 2)
    result = {
        "benchmark": "specdraft eval on the toy pair (demo job's target and draft_init), greedy",
        "command": "python benchmarks/bench_eval.py",
        "settings": {
            "data": "builtin (the toy eval split, round-robin over the 4 tasks)",
            "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens,
            "gamma": args.gamma,
            "temperature": 0.0,
            "repeats": args.repeats,
        },
        "notes": "eval_* times the whole run_eval call (pair check, loading, prompts, analytic "
        "alpha, target-only and speculative decoding); spec_* and target_only_* the greedy "
        "decoding alone. Each batch size shows its median-time run of `repeats`.",
        "machine": host,
        "toy_pair": "from --store (trained there on first use)" if args.store else "trained here",
        "toy_pair_build_seconds": round(build_seconds, 1),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
