"""Stage `data`: the task suite (train and eval splits) and, for the toy world, its tokenizer.

Reads: nothing from the store (the toy world, or `data.source`)
Writes: `dataset/` (train and eval splits: prompt, response, task), `tokenizer/` (toy world); info
`max_length`, `chat_template`, `tasks`, `splits`, `vocab_size`, `has_responses`, `source`
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from specdraft.drafts.toyworld import make_toy_dataset, train_toy_tokenizer
from specdraft.pipeline.config import DataConfig
from specdraft.pipeline.engine.artifacts import StageContext


def run(cfg: DataConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    out, seed = ctx.out, ctx.seed
    if cfg.source != "builtin":
        from specdraft.pipeline.data_sources import load_user_data

        splits = load_user_data(cfg, seed)
        splits.save_to_disk(str(out / "dataset"))
        return {
            "source": cfg.source,
            "max_length": cfg.max_length,
            "chat_template": cfg.chat_template,
            "splits": {name: len(split) for name, split in splits.items()},
            "tasks": dict(Counter(splits["train"]["task"])),
            "has_responses": any(splits["train"]["response"]),
        }
    splits = make_toy_dataset(cfg.train_per_task, cfg.eval_per_task, seed)
    splits.save_to_disk(str(out / "dataset"))
    texts = [row["prompt"] + row["response"] for row in splits["train"]]
    tokenizer = train_toy_tokenizer(texts, cfg.vocab_size, out / "tokenizer")
    lengths = [len(tokenizer(t)["input_ids"]) + 2 for t in texts]
    too_long = sum(n > cfg.max_length for n in lengths)
    if too_long:
        print(
            f"data: {too_long} training sequences exceed data.max_length={cfg.max_length} and are cut"
        )
    return {
        "source": "builtin",
        "max_length": cfg.max_length,
        "chat_template": cfg.chat_template,  # a given target's template (config checks the toy)
        "splits": {name: len(split) for name, split in splits.items()},
        "tasks": dict(Counter(splits["train"]["task"])),
        "has_responses": True,
        "vocab_size": len(tokenizer),
        "max_sequence_tokens": max(lengths),
        "mean_sequence_tokens": round(sum(lengths) / len(lengths), 1),
    }
