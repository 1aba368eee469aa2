"""Stage `reference`: AdaSPEC's reference model, the draft init distilled towards the target with
forward KL on all response tokens (full fine-tuning). It is also the DistillSpec-style baseline.
With a `target_outputs` input the target is not loaded: its stored hidden states and head are (or
its stored top-k log-probabilities, target_outputs.format=topk, at whose temperature it then
distils: distil.temperature, with which the store was made; 1 otherwise).
A draft init with its own vocabulary (the `vocab_trim` stage's, read as `draft_init`, or one with
another tokenizer, draft.vocabulary=intersection) reads its inputs mapped as a server maps them
and is distilled over the intersection of the vocabularies (trainer.KDTrainer).

Reads: `data`, `target` (or `target_outputs`), `draft_init`, `generate`
Writes: `model/`, `history.json`; info `model`, `final_loss`
"""

from __future__ import annotations

from pathlib import Path

from specdraft.drafts.models import device_for
from specdraft.drafts.vocab_trim import draft_vocabulary_map, save_draft_vocabulary
from specdraft.pipeline.config import ReferenceConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    model_location,
    write_json,
)
from specdraft.pipeline.engine.parallel import replica_checksum, train_data_parallel
from specdraft.pipeline.objectives import KDOptions
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stored_target_outputs import load_target_outputs
from specdraft.pipeline.trainer import train_kd


def run(cfg: ReferenceConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    return train_data_parallel(train_reference, cfg, inputs, ctx, stage="reference")


def train_reference(cfg: ReferenceConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    out, seed, trust = ctx.out, ctx.seed, ctx.trust
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust.target)
    stored = None
    teacher = None
    temperature = KDOptions().temperature
    if "target_outputs" in inputs:
        # hidden states, or the top-k at its own temperature (the one distil reads it at)
        stored = load_target_outputs(inputs["target_outputs"], device, temperature=None)
        temperature = getattr(stored, "temperature", temperature)
    else:
        teacher = load_model_artifact(inputs["target"], device, trust_remote_code=trust.target)
    model = load_model_artifact(inputs["draft_init"], device, trust_remote_code=trust.draft)
    model = model.train()
    draft_dir = model_location(inputs["draft_init"])
    target_head = stored.head if stored is not None else teacher
    vocab_map = draft_vocabulary_map(draft_dir, tokenizer, target_head)
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
        options=KDOptions(temperature=temperature),
        ctx=ctx,
        target_outputs=stored,
        vocab_map=vocab_map,
    )
    model.save_pretrained(out / "model")
    save_draft_vocabulary(draft_dir, tokenizer, out / "model")
    write_json(out / "history.json", history)
    return {
        "model": "model",
        "final_loss": history[-1]["loss"] if history else None,
        "temperature": temperature,
        **replica_checksum(model),
    }
