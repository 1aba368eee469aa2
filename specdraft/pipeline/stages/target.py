"""Stage `target`: the toy target fine-tuned on the task suite (SFT, answer tokens only), or the given
model (a GGUF dequantised into a safetensors directory).

Reads: `data` (toy world: its dataset and tokenizer)
Writes: `model/` and `history.json` (toy world or GGUF), else nothing; info `model` (a directory in
the artifact or the user's path/id), `dtype`, `attn_implementation`, `parameters`
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from specdraft.pipeline.config import TargetConfig
from specdraft.pipeline.engine.artifacts import StageContext, given_model
from specdraft.pipeline.engine.parallel import train_data_parallel
from specdraft.pipeline.toy_training import train_toy_model


def run(cfg: TargetConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    if cfg.model != "builtin":
        return given_model(cfg, ctx.out)
    sft = partial(train_toy_model, all_tokens=False)
    return train_data_parallel(sft, cfg, inputs, ctx, stage="target")
