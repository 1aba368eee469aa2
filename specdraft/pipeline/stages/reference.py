"""Stage `reference`: AdaSPEC's reference model, the draft init distilled towards the target with
forward KL on all response tokens (full fine-tuning). It is also the DistillSpec-style baseline.
With a `target_outputs` input the target is not loaded: its stored hidden states and head are.

Reads: `data`, `target` (or `target_outputs`), `draft_init`, `generate`
Writes: `model/`, `history.json`; info `model`, `final_loss`
"""

from __future__ import annotations

from pathlib import Path

from specdraft.drafts.models import device_for
from specdraft.pipeline.config import ReferenceConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    write_json,
)
from specdraft.pipeline.engine.parallel import replica_checksum, train_data_parallel
from specdraft.pipeline.objectives import KDOptions
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stored_target_outputs import StoredTargetOutputs
from specdraft.pipeline.trainer import train_kd


def run(cfg: ReferenceConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    return train_data_parallel(train_reference, cfg, inputs, ctx, stage="reference")


def train_reference(cfg: ReferenceConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    out, seed, trust = ctx.out, ctx.seed, ctx.trust
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    stored = None
    teacher = None
    if "target_outputs" in inputs:
        stored = StoredTargetOutputs.load(inputs["target_outputs"], device)
    else:
        teacher = load_model_artifact(inputs["target"], device, trust_remote_code=trust.target)
    model = load_model_artifact(inputs["draft_init"], device, trust_remote_code=trust.draft)
    model = model.train()
    sequences = load_sequences(inputs["generate"]).select_columns(["input_ids", "response_mask"])
    if stored is not None:  # each sequence's index in what was stored
        sequences = sequences.add_column("row", list(range(len(sequences))))
    history, _ = train_kd(
        model,
        teacher,
        sequences,
        tokenizer,
        cfg.train,
        out,
        seed,
        options=KDOptions(),
        ctx=ctx,
        target_outputs=stored,
    )
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json(out / "history.json", history)
    return {
        "model": "model",
        "final_loss": history[-1]["loss"] if history else None,
        **replica_checksum(model),
    }
