"""Benchmark fused_kd_loss against the plain full-logits reference: CPU, fp32, forward + backward.

    python benchmarks/bench_kd_loss.py            # N=4096, V=32768, H=1024, ~4 min on 2 cores

Time: both variants run in this process on the same inputs, alternating (A B, B A, ...), and the
median of the repeats is reported (wall clock, and process CPU time, which is steadier on a shared
machine). Memory: each variant runs once in a fresh subprocess; its peak extra memory is the peak
RSS (ru_maxrss) minus the RSS just before the call, with inputs already allocated. Gradients
(student hidden and LM head) count towards both. Targets: fused time <= 1.3x and peak extra memory
<= 20% of the reference's. Results go to benchmarks/results/kd_loss_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from specdraft.pipeline.engine.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from kd_reference import kd_loss_reference  # noqa: E402

from specdraft.kernels import fused_kd_loss  # noqa: E402
from specdraft.kernels.kd_loss import default_chunk_rows  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "kd_loss_cpu.json"
VARIANTS = {"reference": kd_loss_reference, "fused": fused_kd_loss}
TIME_RATIO_MAX, MEMORY_RATIO_MAX = 1.3, 0.2


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scale = 3 / hidden**0.5  # logits with a std of about 3
    student_hidden = torch.randn(tokens, hidden, generator=gen).requires_grad_(True)  # (N, H)
    student_weight = (torch.randn(vocab, hidden, generator=gen) * scale).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, hidden, generator=gen)  # (N, H)
    teacher_weight = torch.randn(vocab, hidden, generator=gen) * scale  # (V, H)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def forward_backward(name: str, inputs, divergence: str) -> float:
    student_hidden, student_weight = inputs[:2]
    student_hidden.grad = student_weight.grad = None
    loss = VARIANTS[name](*inputs, divergence=divergence)
    loss.backward()
    return loss.item()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory_child(args) -> None:
    """Runs in a fresh process: one forward + backward, prints its peak extra memory as JSON."""
    torch.set_num_threads(args.threads)
    forward_backward(args.child, make_inputs(8, 256, 64), args.divergence)  # load kernels
    inputs = make_inputs(args.tokens, args.vocab, args.hidden)
    rss_before = current_rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    loss = forward_backward(args.child, inputs, args.divergence)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "peak_extra_mib": (peak - rss_before) / 2**20,
                "new_peak": peak > peak_before,  # else the measurement is only a lower bound
                "cold_run_s": seconds,
                "loss": loss,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--divergence", default="fkl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_memory_child(args)
        return
    torch.set_num_threads(args.threads)
    info = describe_machine()
    dims = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    dims += ["--divergence", args.divergence, "--threads", str(args.threads)]

    memory = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, *dims]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {name}: {memory[name]['peak_extra_mib']:.0f} MiB", flush=True)

    inputs = make_inputs(args.tokens, args.vocab, args.hidden)
    for name in VARIANTS:
        forward_backward(name, make_inputs(8, 256, 64), args.divergence)  # load kernels
    wall = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    losses = {}
    order = list(VARIANTS)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            losses[name] = forward_backward(name, inputs, args.divergence)
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
            print(f"repeat {repeat} {name}: {wall[name][-1]:.2f} s", flush=True)

    results = {
        name: {
            "median_wall_s": statistics.median(wall[name]),
            "wall_s": wall[name],
            "median_cpu_s": statistics.median(cpu[name]),
            "cpu_s": cpu[name],
            "peak_extra_mib": memory[name]["peak_extra_mib"],
            "peak_is_new": memory[name]["new_peak"],
            "loss": losses[name],
        }
        for name in VARIANTS
    }
    ref, fused = results["reference"], results["fused"]
    time_ratio = fused["median_wall_s"] / ref["median_wall_s"]
    memory_ratio = fused["peak_extra_mib"] / ref["peak_extra_mib"]
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    report = {
        "benchmark": "fused_kd_loss vs kd_loss_reference, forward + backward, CPU fp32",
        "machine": info,
        "config": {
            "tokens_N": args.tokens,
            "vocab_V": args.vocab,
            "hidden_H": args.hidden,
            "divergence": args.divergence,
            "reduction": "mean",
            "chunk_size": f"None -> {min(default_chunk_rows(args.vocab), args.tokens)} rows",
            "repeats": args.repeats,
        },
        "results": results,
        "time_ratio_fused_over_reference": time_ratio,
        "cpu_time_ratio_fused_over_reference": fused["median_cpu_s"] / ref["median_cpu_s"],
        "memory_ratio_fused_over_reference": memory_ratio,
        "targets": {"time_ratio_max": TIME_RATIO_MAX, "memory_ratio_max": MEMORY_RATIO_MAX},
        "targets_met": time_ratio <= TIME_RATIO_MAX and memory_ratio <= MEMORY_RATIO_MAX,
        "loss_relative_difference": abs(fused["loss"] - ref["loss"]) / abs(ref["loss"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"time ratio {time_ratio:.2f} (target <= {TIME_RATIO_MAX}), memory ratio "
        f"{memory_ratio:.3f} (target <= {MEMORY_RATIO_MAX}); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
