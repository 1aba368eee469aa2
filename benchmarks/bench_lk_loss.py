"""The LK hybrid and weighted losses in one fused pass against the two-pass composition they replace.

    python benchmarks/bench_lk_loss.py     # the real pair's shapes, ~3 min on 2 cores

Until this benchmark's commit, `kd_loss_sum` built the LK hybrid from two fused passes with
reduction "none" (KL rows, then TV rows, each recomputed in backward for the per-row upstream
gradient: 3 passes of the two heads' matmuls each) and weighted losses (position weighting) from
one such pass; all-token forward KL used one "sum" pass, whose forward computes the gradients too.
Now every one of them is a single "sum" pass. The shapes are the SmolLM2-135M pair's distil step
(8 sequences of ~48 response tokens, V = 49 152, H = 576 for both heads).

Variants, forward + backward on the same inputs, alternating in this process (A B C …, then
reversed), median of the repeats (wall clock and process CPU time): `fkl` (the floor: one pass),
`lk_composed` / `lk_fused` (λ per row), `lk_batch_composed` / `lk_batch_fused` (one given α),
`fkl_weighted_composed` / `fkl_weighted_fused` (per-row weights). Each pair's losses and gradients
must agree. Results go to benchmarks/results/lk_loss_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_kd_loss import make_inputs as make_heads  # this script's folder is on sys.path

from specdraft.kernels import fused_kd_loss
from specdraft.pipeline.engine.machine import describe_machine

RESULT = Path(__file__).resolve().parent / "results" / "lk_loss_cpu.json"
ETA, BATCH_ALPHA = 3.0, 0.3


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    """The KD benchmark's heads (logits with a std of about 3) and (N,) position weights."""
    heads = make_heads(tokens, vocab, hidden, seed)
    return heads, torch.rand(tokens, generator=torch.Generator().manual_seed(seed + 1))


def _rows(heads, divergence):
    return fused_kd_loss(*heads, divergence=divergence, reduction="none")  # (N,)


def lk_composed(heads, weights, alpha):
    """The replaced path: λ·KL + (1 − λ)·TV from two per-row passes."""
    kl, tv = _rows(heads, "fkl"), _rows(heads, "tvd")
    beta = 1.0 - tv.detach() if alpha is None else torch.full_like(tv, alpha)
    lam = torch.exp(-ETA * beta)
    return (lam * kl + (1.0 - lam) * tv).sum()


VARIANTS = {
    "fkl": lambda h, w: fused_kd_loss(*h, divergence="fkl", reduction="sum"),
    "lk_composed": lambda h, w: lk_composed(h, w, None),
    "lk_fused": lambda h, w: fused_kd_loss(*h, divergence="lk", reduction="sum", lk_eta=ETA),
    "lk_batch_composed": lambda h, w: lk_composed(h, w, BATCH_ALPHA),
    "lk_batch_fused": lambda h, w: fused_kd_loss(
        *h, divergence="lk", reduction="sum", lk_eta=ETA, lk_alpha=BATCH_ALPHA
    ),
    "fkl_weighted_composed": lambda h, w: (_rows(h, "fkl") * w).sum(),
    "fkl_weighted_fused": lambda h, w: fused_kd_loss(
        *h, divergence="fkl", reduction="sum", weights=w
    ),
}
PAIRS = [("lk_composed", "lk_fused"), ("lk_batch_composed", "lk_batch_fused")]
PAIRS += [("fkl_weighted_composed", "fkl_weighted_fused")]


def forward_backward(name: str, heads, weights):
    heads[0].grad = heads[1].grad = None
    loss = VARIANTS[name](heads, weights)
    loss.backward()
    return loss.item(), heads[0].grad.clone(), heads[1].grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = describe_machine()
    info["load_average_1m_at_start"] = os.getloadavg()[0]
    heads, weights = make_inputs(args.tokens, args.vocab, args.hidden)
    small = make_inputs(8, 256, 64)
    for name in VARIANTS:
        forward_backward(name, *small)  # load kernels
    wall = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    outputs = {}
    order = list(VARIANTS)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = forward_backward(name, heads, weights)
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
        print(
            f"repeat {repeat}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in order), flush=True
        )

    def rel(a, b):
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    pairs = {}
    for composed, fused in PAIRS:
        pairs[fused] = {
            "speedup_wall": statistics.median(wall[composed]) / statistics.median(wall[fused]),
            "speedup_cpu": statistics.median(cpu[composed]) / statistics.median(cpu[fused]),
            "over_fkl_wall": statistics.median(wall[fused]) / statistics.median(wall["fkl"]),
            "relative_difference": {
                part: rel(outputs[fused][i], outputs[composed][i])
                for i, part in enumerate(("loss", "grad_hidden", "grad_head"))
            },
        }
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    report = {
        "benchmark": "LK hybrid and weighted KD: one fused pass vs the two-pass composition, "
        "forward + backward, CPU fp32",
        "machine": info,
        "config": {
            "tokens_N": args.tokens,
            "vocab_V": args.vocab,
            "hidden_H": args.hidden,
            "lk_eta": ETA,
            "batch_alpha": BATCH_ALPHA,
            "repeats": args.repeats,
            "threads": args.threads,
        },
        "results": {
            name: {
                "median_wall_s": statistics.median(wall[name]),
                "wall_s": wall[name],
                "median_cpu_s": statistics.median(cpu[name]),
                "cpu_s": cpu[name],
            }
            for name in VARIANTS
        },
        "fused_vs_composed": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    for fused, row in pairs.items():
        print(
            f"{fused}: {row['speedup_wall']:.2f}x faster than composed, "
            f"{row['over_fkl_wall']:.2f}x fkl's time; max rel diff "
            + ", ".join(f"{k} {v:.1e}" for k, v in row["relative_difference"].items())
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
