"""Stage `target_outputs`: the frozen target's final hidden states (after its last norm, before the
LM head) for one generate stage's sequences, computed once and stored as sharded safetensors
beside its LM head, so that `reference`, every `distil` round and every recipe of a comparison
read them instead of running the target at each step (pipeline/stored_target_outputs.py).

Only the positions the KD loss uses are kept: those whose next token is a response token, in the
order the trainer takes them. Stored in bf16 when every stage reading them trains in bf16.

Reads: `target` (its model), `generate` (the sequences)
Writes: sharded safetensors of the target's final hidden states and its LM head
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdraft.drafts.hidden_states import hidden_and_head
from specdraft.drafts.models import device_for
from specdraft.drafts.pair import refuse_logit_transforms
from specdraft.pipeline.batches import Collator, response_positions
from specdraft.pipeline.config import TargetOutputsConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    load_model_artifact,
    load_tokenizer_artifact,
)
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stored_target_outputs import write_target_outputs


def run(cfg: TargetOutputsConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    trust = ctx.trust.target  # only the target is loaded
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=trust)
    target = load_model_artifact(inputs["target"], device, trust_remote_code=trust).eval()
    # the stored path multiplies these hidden states by the head weight and nothing else
    refuse_logit_transforms(target, "target")
    sequences = load_sequences(inputs["generate"]).select_columns(["input_ids", "response_mask"])
    rows, head = target_hidden_rows(
        target, sequences, tokenizer.pad_token_id, cfg.batch_size, cfg.precision
    )
    info = write_target_outputs(ctx.out, rows, head)
    return {
        **info,
        "hidden_size": int(head.shape[1]),
        "vocab": int(head.shape[0]),
        "dtype": cfg.precision,
        "head_dtype": str(head.dtype).removeprefix("torch."),
    }


def target_hidden_rows(
    target, sequences, pad_id: int, batch_size: int, precision: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per sequence, the target's final hidden states at its response-predicting positions
    ((n_r, H), bf16 or fp32 by `precision`, on the CPU), and the target's (V, H) LM head. The
    forward runs as the live KD path runs it: padded batches, bf16 autocast when asked."""
    device = next(target.parameters()).device
    collate = Collator(pad_id)
    bf16 = precision == "bf16"
    stored_dtype = torch.bfloat16 if bf16 else torch.float32
    rows: list[torch.Tensor] = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="target outputs"):
        end = min(start + batch_size, len(sequences))
        batch = collate(list(sequences.select(range(start, end))))
        batch = {k: v.to(device) for k, v in batch.items()}
        counted = response_positions(batch).cpu()  # (B, T-1)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), autocast:
            hidden, _ = hidden_and_head(target, batch["input_ids"], batch["attention_mask"])
        hidden = hidden[:, :-1].to(stored_dtype).cpu()  # (B, T-1, H)
        rows += [hidden[i][counted[i]].clone() for i in range(hidden.shape[0])]
    return rows, target.get_output_embeddings().weight.detach()
