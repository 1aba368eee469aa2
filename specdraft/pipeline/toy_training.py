"""Training the builtin toy target (SFT on answer tokens) and toy draft (pre-training on whole
sequences): what the `target` and `draft_init` stages run when their model is `builtin`."""

from __future__ import annotations

from pathlib import Path

from specdraft.drafts.models import count_parameters, device_for, load_tokenizer, toy_llama
from specdraft.pipeline.batches import encode_dataset
from specdraft.pipeline.engine.artifacts import StageContext, write_json
from specdraft.pipeline.engine.parallel import replica_checksum
from specdraft.pipeline.sequences import load_splits, max_length_of, tokenizer_dir
from specdraft.pipeline.trainer import train_cross_entropy


def train_toy_model(cfg, inputs: dict[str, Path], ctx: StageContext, *, all_tokens: bool) -> dict:
    """Shared by the toy target (SFT) and the toy draft (pre-training): build, train, save."""
    out, seed = ctx.out, ctx.seed
    data_artifact = inputs["data"]
    tokenizer = load_tokenizer(tokenizer_dir(data_artifact))
    max_length = max_length_of(data_artifact)
    model = toy_llama(cfg.arch, tokenizer, max_positions=max_length, seed=seed)
    model.to(device_for(cfg.resources.gpus))
    encoded = encode_dataset(load_splits(data_artifact)["train"], tokenizer, max_length)
    history = train_cross_entropy(
        model, encoded, tokenizer, cfg.train, out, seed, all_tokens=all_tokens, ctx=ctx
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json(out / "history.json", history)
    return {
        "model": "model",
        "parameters": count_parameters(model),
        "final_loss": history[-1]["loss"] if history else None,
        **replica_checksum(model),
    }
