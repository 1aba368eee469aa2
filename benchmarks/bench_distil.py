"""End-to-end distil stage throughput with and without the fused KD loss, on the toy world.

Builds the demo job's stages up to `reference` (cached in --store), then runs the `distil` stage
with `distil.fused_loss` true and false, alternating, and reports training tokens/s (response
tokens through the loss per second of the whole stage) for each, measured side by side.

    python benchmarks/bench_distil.py --store /tmp/store

The toy vocabulary is 512 tokens, so the (tokens x vocab) logits are small and the fused loss
mainly has to not be slower here; its memory win shows at real vocabularies
(benchmarks/bench_kd_loss.py, V = 32768).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.artifacts import StageContext
from specdraft.pipeline.engine.dag import execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.machine import describe_machine
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stages import distil

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "distil_cpu.json"
UPSTREAM = ("data", "target", "draft_init", "generate", "reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", type=Path, default=None, help="artifact store to build/reuse the toy stages in"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="bench-distil-"))
    job = load_job(REPO / "specdraft" / "jobs" / "demo.yaml", ["distil.eval_every=0"])
    upstream = execute([s for s in build_stages(job) if s.name in UPSTREAM], store, use_ray=False)
    inputs = {name: result.path for name, result in upstream.items()}
    sequences = load_sequences(inputs["generate"])
    mean_response = statistics.mean(sum(m[1:]) for m in sequences["response_mask"])
    tokens = job.distil.train.steps * job.distil.train.batch_size * mean_response

    runs: dict[str, list[float]] = {"fused": [], "plain_logits": []}
    for _ in range(args.repeats):
        for name, fused in (("fused", True), ("plain_logits", False)):
            cfg = dataclasses.replace(job.distil, fused_loss=fused)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                distil.run(cfg, inputs, StageContext(Path(out), job.seed))
                runs[name].append(time.perf_counter() - start)
    result = {
        "benchmark": "distil stage (demo job, AdaSPEC top-40 %, LoRA) with the fused KD loss vs plain logits",
        "command": "python benchmarks/bench_distil.py",
        "machine": describe_machine(),
        "steps": job.distil.train.steps,
        "batch_size": job.distil.train.batch_size,
        "mean_response_tokens": round(mean_response, 1),
        "seconds": runs,
        "tokens_per_second": {k: round(tokens / statistics.median(v), 1) for k, v in runs.items()},
    }
    result["fused_over_plain_throughput"] = round(
        result["tokens_per_second"]["fused"] / result["tokens_per_second"]["plain_logits"], 3
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("tokens_per_second", "fused_over_plain_throughput")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
