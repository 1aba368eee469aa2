"""Stage `draft_init`: the toy draft pre-trained briefly with cross-entropy on whole sequences
(the off-the-shelf small model a user would start from), or the given model."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from specdraft.pipeline.config import DraftConfig
from specdraft.pipeline.engine.artifacts import StageContext, given_model
from specdraft.pipeline.engine.parallel import train_data_parallel
from specdraft.pipeline.toy_training import train_toy_model


def run(cfg: DraftConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    if cfg.model != "builtin":
        return given_model(cfg)
    pretrain = partial(train_toy_model, all_tokens=True)
    ctx = dataclasses.replace(ctx, seed=ctx.seed + 1)  # not the target's initialisation
    return train_data_parallel(pretrain, cfg, inputs, ctx, stage="draft")
