"""Stage `vocab_trim` (draft.keep_vocab = K > 0): the draft init with its vocabulary trimmed to the
K target token ids most frequent in the generate stage's target-written responses (ties: their
count in the prompts, then the smaller id), bos/eos/pad/unk always among them (drafts/vocab_trim.py).
Its embedding and LM head keep those rows, its tokenizer is a WordLevel vocabulary of exactly those
token strings (plus an added unk when the target has none), and `kept_ids.json` records the set.
reference, distil, evaluate, export and report read it in place of the draft init.

Reads: `target` (its tokenizer), `draft_init` (its model), `generate` (the sequences)
Writes: `model/` (the trimmed draft: weights, config, WordLevel tokenizer, kept_ids.json),
`frequencies.json` (the kept ids' response and prompt counts); info `model`, `dtype`,
`attn_implementation`, `keep_vocab`, `draft_vocab`, `added_unk`, `intersection`, `parameters`,
`untrimmed_parameters`, `response_coverage` (the share of response tokens the kept set holds)
"""

from __future__ import annotations

import json
from pathlib import Path

from specdraft.drafts.vocab_trim import (
    check_keep_vocab,
    count_tokens,
    most_frequent_ids,
    served_map_for,
    special_token_ids,
    write_trimmed_draft,
)
from specdraft.pipeline.config import VocabTrimConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
    read_manifest,
)
from specdraft.pipeline.sequences import load_sequences


def run(cfg: VocabTrimConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=ctx.trust.target)
    check_keep_vocab(cfg.keep_vocab, tokenizer)
    model = load_model_artifact(inputs["draft_init"], trust_remote_code=ctx.trust.draft)
    rows = model.config.get_text_config().vocab_size
    specials = special_token_ids(tokenizer)
    keep = cfg.keep_vocab - (getattr(tokenizer, "unk_token_id", None) is None)  # an added unk
    sequences = load_sequences(inputs["generate"]).select_columns(["input_ids", "response_mask"])
    response, prompt = count_tokens(sequences, rows)
    kept = most_frequent_ids(response[: len(tokenizer)], prompt[: len(tokenizer)], keep, specials)
    info = write_trimmed_draft(model, tokenizer, kept, ctx.out / "model")
    served = served_map_for(tokenizer, rows, ctx.out / "model")
    coverage = float(response[kept].sum()) / max(1, int(response.sum()))
    (ctx.out / "frequencies.json").write_text(
        json.dumps(
            {
                "kept_ids": kept,
                "response_counts": response[kept].tolist(),
                "prompt_counts": prompt[kept].tolist(),
            }
        )
    )
    print(
        f"vocab_trim: kept {len(kept)} of {len(tokenizer)} token ids ({coverage:.1%} of the "
        f"responses' tokens), {served.intersection} mapped by token string as a server maps them"
    )
    made = read_manifest(inputs["draft_init"])["info"]
    return {
        "model": "model",
        "dtype": made.get("dtype", "float32"),
        "attn_implementation": made.get("attn_implementation", "auto"),
        "keep_vocab": cfg.keep_vocab,
        "intersection": served.intersection,
        "response_coverage": coverage,
        **info,
    }
