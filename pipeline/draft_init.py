"""Stage `draft_init`: the toy draft pre-trained briefly with cross-entropy on whole sequences
(the off-the-shelf small model a user would start from), or the given model."""

from __future__ import annotations

from pathlib import Path

from specdraft.pipeline.config import DraftConfig
from specdraft.pipeline.target import given_model, train_toy_model


def run(cfg: DraftConfig, inputs: dict[str, Path], out: Path, *, seed: int) -> dict:
    if cfg.model != "builtin":
        return given_model(cfg)
    return train_toy_model(cfg, inputs["data"], out, seed + 1, all_tokens=True)
