"""Stage `draft_init`: the toy draft pre-trained briefly with cross-entropy on whole sequences
(the off-the-shelf small model a user would start from), the given model (a GGUF dequantised into a
safetensors directory), or the target's own first layers (`from_target_layers`). A given model
with another tokenizer (draft.vocabulary=intersection) is saved into `model/` with its own
tokenizer files and `vocabulary.json`, the mark by which the later stages train, judge and export
it through the intersection of the vocabularies (drafts/vocab_trim.has_own_vocabulary).

Reads: `data`; `target` with `from_target_layers`
Writes: `model/` and `history.json` (toy world), `model/` (GGUF, a layer cut, or a draft with
another tokenizer), else nothing; info `model`, `dtype`, `attn_implementation`, `parameters`,
`vocabulary` (intersection)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from specdraft.drafts.models import (
    DTYPES,
    copy_tokenizer_files,
    count_parameters,
    first_layers_model,
    load_causal_lm,
)
from specdraft.drafts.vocab_trim import mark_intersection
from specdraft.pipeline.config import DraftConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    given_model,
    load_model_artifact,
    model_location,
)
from specdraft.pipeline.engine.parallel import train_data_parallel
from specdraft.pipeline.toy_training import train_toy_model


def run(cfg: DraftConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    if cfg.from_target_layers:
        return layer_draft(cfg, inputs["target"], ctx)
    if cfg.model != "builtin" and cfg.vocabulary == "intersection":
        return foreign_draft(cfg, ctx)
    if cfg.model != "builtin":
        return given_model(cfg, ctx.out)
    pretrain = partial(train_toy_model, all_tokens=True)
    ctx = dataclasses.replace(ctx, seed=ctx.seed + 1)  # not the target's initialisation
    return train_data_parallel(pretrain, cfg, inputs, ctx, stage="draft")


def foreign_draft(cfg: DraftConfig, ctx: StageContext) -> dict:
    """The given model (a GGUF dequantised) saved in `model/` with its own tokenizer files and
    marked as a draft served through the intersection of the vocabularies: the mark must sit
    beside the weights every later stage loads, so a directory or hub id is copied, not recorded."""
    from specdraft.drafts.gguf import is_gguf

    info = given_model(cfg, ctx.out)
    if not is_gguf(cfg.model):
        model = load_causal_lm(
            cfg.model, cfg.dtype, cfg.attn_implementation, trust_remote_code=ctx.trust.draft
        )
        model.save_pretrained(ctx.out / "model", safe_serialization=True)
        copy_tokenizer_files(cfg.model, ctx.out / "model")
        info.update(model="model", parameters=count_parameters(model))
    mark_intersection(ctx.out / "model", cfg.model)
    print(
        f"draft: {cfg.model} with its own tokenizer, served through the vocabularies' intersection"
    )
    return {**info, "vocabulary": "intersection"}


def layer_draft(cfg: DraftConfig, target: Path, ctx: StageContext) -> dict:
    """The target's embeddings, first `from_target_layers` decoder layers, final norm and LM head,
    saved in `model/` as a plain model of its architecture, with the target's tokenizer files."""
    model = load_model_artifact(target, trust_remote_code=ctx.trust.target)
    depth = model.config.get_text_config().num_hidden_layers
    draft = first_layers_model(model, cfg.from_target_layers).to(DTYPES[cfg.dtype])
    draft.save_pretrained(ctx.out / "model", safe_serialization=True)
    copy_tokenizer_files(model_location(target), ctx.out / "model")
    print(f"draft: the target's first {cfg.from_target_layers} of {depth} layers")
    return {
        "model": "model",
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
        "from_target_layers": cfg.from_target_layers,
        "target_layers": depth,
        "parameters": count_parameters(draft),
        "target_parameters": count_parameters(model),
    }
