"""Distil steps/s with the target's outputs stored once (stage target_outputs) vs the target run
live at every step, side by side in one process.

1. The demo job: its stages up to `reference` and `target_outputs` are built (cached in --store),
   then the `distil` stage runs with and without its `target_outputs` input, alternating.
2. A real-pair-sized model (--real): a SmolLM2-135M-shaped Llama target (30 layers, width 576,
   vocabulary 49 152, tied head) built in code with random weights and a draft of its first 4
   layers, trained with all-token forward KL in full (the issue's real-pair recipe) through
   train_kd, live and stored; the one-off cost of computing the stored outputs is reported too.

    python benchmarks/bench_target_outputs.py --store /tmp/store --real
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from specdraft.pipeline.config import TrainConfig, load_job
from specdraft.pipeline.engine.artifacts import StageContext
from specdraft.pipeline.engine.dag import execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.engine.machine import describe_machine
from specdraft.pipeline.objectives import KDOptions
from specdraft.pipeline.stages import distil
from specdraft.pipeline.stages.target_outputs import target_hidden_rows
from specdraft.pipeline.stored_target_outputs import StoredTargetOutputs, write_target_outputs
from specdraft.pipeline.trainer import train_kd

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "target_outputs_cpu.json"
UPSTREAM = ("data", "target", "draft_init", "generate", "target_outputs", "reference")


class StepTimes(TrainerCallback):
    """Wall-clock seconds of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def demo(store: Path, repeats: int) -> dict:
    job = load_job(REPO / "specdraft" / "jobs" / "demo.yaml")
    built = execute([s for s in build_stages(job) if s.name in UPSTREAM], store, use_ray=False)
    inputs = {name: result.path for name, result in built.items()}
    live_inputs = {k: v for k, v in inputs.items() if k != "target_outputs"}
    runs: dict[str, list[float]] = {"live": [], "stored": []}
    for _ in range(repeats):
        for name, given in (("live", live_inputs), ("stored", inputs)):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                distil.run(job.distil, given, StageContext(Path(out), job.seed))
                runs[name].append(time.perf_counter() - start)
    steps = job.distil.train.steps
    per_second = {k: round(steps / statistics.median(v), 2) for k, v in runs.items()}
    return {
        "what": "the demo job's distil stage as shipped (AdaSPEC top-40 %, LoRA, held-out alpha "
        "every 25 steps), whole stage: loading, training, checks, saving",
        "steps": steps,
        "batch_size": job.distil.train.batch_size,
        "stage_seconds": runs,
        "target_outputs_stage_seconds": built["target_outputs"].manifest["seconds"],
        "steps_per_second": per_second,
        "stored_over_live": round(per_second["stored"] / per_second["live"], 3),
    }


def real_pair_sized(steps: int, batch: int, prompts: int) -> dict:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=30, **shape)).eval()
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **shape))
    draft.load_state_dict(target.state_dict(), strict=False)  # embeddings, layers 0-3, norm
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(prompts):  # 32-token prompt, 48-token response (the budget)
        ids = torch.randint(1, shape["vocab_size"], (80,), generator=g).tolist()
        rows.append({"input_ids": ids, "response_mask": [0] * 32 + [1] * 48})
    data = Dataset.from_list(rows)

    class Tok:
        pad_token_id = 0

        def __len__(self) -> int:  # KD compares the heads over the tokenizer's ids
            return shape["vocab_size"]

    cfg = TrainConfig(steps=steps, batch_size=batch, lr=5e-4, log_every=1, packing="padded")
    start = time.perf_counter()
    hidden, head = target_hidden_rows(target, data, 0, 16, "fp32")
    with tempfile.TemporaryDirectory() as folder:
        write_target_outputs(Path(folder), hidden, head)
        stored = StoredTargetOutputs.load(Path(folder))
    make_seconds = time.perf_counter() - start
    times: dict[str, list[float]] = {}
    for name in ("live", "stored"):
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as out:
            train_kd(
                copy.deepcopy(draft),
                target if name == "live" else None,
                data.add_column("row", list(range(len(data)))),
                Tok(),
                cfg,
                Path(out),
                seed=0,
                options=KDOptions(divergence="fkl", selection="all"),
                callbacks=[timer],
                target_outputs=stored if name == "stored" else None,
            )
        times[name] = timer.seconds
    # the first step warms up allocators and thread pools: left out of the median
    per_second = {k: round(1 / statistics.median(v[1:] or v), 3) for k, v in times.items()}
    return {
        "what": "train_kd, forward KL on all response tokens, full fine-tuning, fp32: a random "
        "30-layer 576-wide Llama target (SmolLM2-135M's shape, vocabulary 49 152, tied) and a "
        "draft of its first 4 layers; 80-token sequences (32 prompt + 48 response)",
        "target_parameters": sum(p.numel() for p in target.parameters()),
        "draft_parameters": sum(p.numel() for p in draft.parameters()),
        "steps": steps,
        "batch_size": batch,
        "step_seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
        "steps_per_second": per_second,
        "stored_over_live": round(per_second["stored"] / per_second["live"], 3),
        "stored_outputs_seconds": round(make_seconds, 2),
        "stored_outputs_sequences": prompts,
        "stored_outputs_mib": round(stored.hidden.nbytes / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="store for the demo's stages")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--real", action="store_true", help="also the real-pair-sized model")
    parser.add_argument("--real-steps", type=int, default=5)
    parser.add_argument("--real-batch", type=int, default=8)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="bench-target-outputs-"))
    machine = describe_machine()
    result = {
        "benchmark": "distil steps/s with the target's outputs stored once vs run live each step",
        "command": "python benchmarks/bench_target_outputs.py" + (" --real" if args.real else ""),
        "machine": machine,
        "note": args.note,
        "demo": demo(store, args.repeats),
    }
    if args.real:
        result["real_pair_sized"] = real_pair_sized(
            args.real_steps, args.real_batch, args.real_steps * args.real_batch
        )
    result["load_average_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {
        k: v["stored_over_live"]
        for k, v in result.items()
        if isinstance(v, dict) and "stored_over_live" in v
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
