"""The cost of Ray: the demo job through Ray tasks vs the same stages in-process, and the generate
stage with 1 vs 2 data-parallel workers.

    python benchmarks/bench_ray.py            # about 10 minutes on a 2-core CPU

1. `specdraft run` and `specdraft run --no-ray` of the demo, each cold in an empty store, alternating
   (`--repeats` times): wall seconds of the whole command, Ray's start-up included.
2. With the demo's upstream stages cached, the generate stage (512 prompts, draft-sampled) run
   through Ray with `resources.workers` 1 (2 CPUs) and 2 (1 CPU each), alternating: wall seconds of
   the stage, and whether the two sequence sets are identical (they must be).
On a 2-core machine two workers share the cores one worker already uses: expect no speed-up there.
On a GPU machine, `--gpus N` runs step 2 with 1 vs N workers of one GPU each instead (results go to
ray_gpu.json unless --out says otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from specdraft.pipeline.config import Resources, load_job
from specdraft.pipeline.engine.dag import Stage, execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.machine import describe_machine
from specdraft.pipeline.sequences import load_sequences

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "ray_cpu.json"
UPSTREAM = ("data", "target", "draft_init")


def time_demo(no_ray: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as root:
        env = {**os.environ, "SPECDRAFT_STORE": f"{root}/store"}
        command = ["specdraft", "run", "--out", f"{root}/out"] + (["--no-ray"] if no_ray else [])
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        return time.perf_counter() - start


def time_generate(store: Path, repeats: int, gpus: int) -> dict:
    import ray

    job = load_job(REPO / "specdraft" / "jobs" / "demo.yaml")
    upstream = [s for s in build_stages(job) if s.name in UPSTREAM]
    execute(upstream, store, use_ray=False)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    # CPU: 1 worker with both cores vs 2 with one each; GPU: 1 vs `gpus` workers of one GPU each.
    settings = [(1, 2), (2, 1)] if not gpus else [(1, 1), (gpus, 1)]  # (workers, cpus each)
    n = settings[1][0]
    seconds: dict[str, list[float]] = {"1": [], str(n): []}
    sequences = {}
    try:
        for _ in range(repeats):
            for workers, cpus in settings:
                resources = Resources(cpus=cpus, gpus=1 if gpus else 0, workers=workers)
                cfg = dataclasses.replace(job.generate, resources=resources)
                stage = Stage(
                    "generate",
                    "specdraft.pipeline.stages.generate",
                    cfg,
                    ("data", "target", "draft_init"),
                    cfg.resources,
                    job.seed,
                )
                start = time.perf_counter()
                results = execute(
                    [*upstream, stage], store, use_ray=True, force={"generate"}, say=lambda _: None
                )
                seconds[str(workers)].append(time.perf_counter() - start)
                sequences[workers] = load_sequences(results["generate"].path).to_list()
    finally:
        ray.shutdown()
    return {
        "prompts": job.generate.num_prompts,
        "seconds": seconds,
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "gpus_per_worker": 1 if gpus else 0,
        f"ratio_{n}_over_1": statistics.median(seconds[str(n)]) / statistics.median(seconds["1"]),
        "identical_output": sequences[1] == sequences[n],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--gpus", type=int, default=0, help="GPU machine: 1 vs this many workers")
    args = parser.parse_args()
    args.out = args.out or (RESULT.with_name("ray_gpu.json") if args.gpus else RESULT)
    demo: dict[str, list[float]] = {"ray": [], "in_process": []}
    for _ in range(args.repeats):
        demo["ray"].append(time_demo(no_ray=False))
        demo["in_process"].append(time_demo(no_ray=True))
    with tempfile.TemporaryDirectory(prefix="bench-ray-gen-") as store:
        generate = time_generate(Path(store), args.repeats, args.gpus)
    result = {
        "benchmark": "Ray overhead: demo via Ray vs in-process; generate with 1 vs N workers",
        "command": "python benchmarks/bench_ray.py",
        "machine": describe_machine(),
        "demo_cold_seconds": demo,
        "demo_median_seconds": {k: statistics.median(v) for k, v in demo.items()},
        "demo_ray_over_in_process": statistics.median(demo["ray"])
        / statistics.median(demo["in_process"]),
        "generate": generate,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
