"""Stage `target_outputs`: what KD needs of the frozen target for one generate stage's sequences,
computed once and stored as sharded safetensors, so that `reference`, every `distil` round and
every recipe and draft of a comparison read them instead of running the target at each step
(pipeline/stored_target_outputs.py). target_outputs.format says what is stored:

- `hidden`: the target's final hidden states (after its last norm, before the LM head) beside
  its LM head; exact, H values a token. Stored in bf16 when every stage reading them trains in bf16.
- `topk`: the target's k most likely ids and their log-probabilities at the distillation
  temperature, and the log of the rest of its mass (6k + 2 bytes a token, whatever the target's
  width), over the tokenizer's ids.

Only the positions the KD loss uses are kept: those whose next token is a response token, in the
order the trainer takes them.

The sequences are run in parts of PART_SEQUENCES; each finished part is saved in the stage's
checkpoint directory (kept across a failed attempt, removed once the artifact is published), so a
stage killed mid-way resumes from its last finished part instead of running the target again over
everything (a damaged part is run again). `resources.workers` > 1 spreads the parts over Ray
workers, each with its own copy of the target (contiguous runs of parts; the rows are the same
for any count); a worker on a machine without the checkpoint directory keeps no parts.

Reads: `target` (its model), `generate` (the sequences)
Writes: sharded safetensors (hidden states and the LM head, or top-k ids and log-probabilities);
info `format`, `rows`, `tokens`, `bytes_per_token`, `workers` (and for topk `k`, `vocab`,
`temperature`, `tail_mass_mean`, `tail_mass_max`)
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
from specdraft.pipeline.engine.parallel import map_shards, shard_bounds
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stored_target_outputs import (
    TopkTargets,
    topk_log_probs,
    write_target_outputs,
    write_topk_outputs,
)


def run(cfg: TargetOutputsConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    """The target over the generate stage's sequences in parts; `resources.workers` > 1 spreads
    the parts over Ray workers (the rows are the same for any count)."""
    sequences = load_sequences(inputs["generate"])
    tokenizer = load_tokenizer_artifact(inputs["target"], trust_remote_code=ctx.trust.target)
    parts = part_bounds(len(sequences))
    paths = {k: str(v) for k, v in inputs.items()}
    folder = None
    if ctx.checkpoints is not None:  # finished parts are kept here until the stage publishes
        ctx.checkpoints.mkdir(parents=True, exist_ok=True)
        folder = str(ctx.checkpoints)
    bounds = shard_bounds(len(parts), cfg.resources.workers, 1)
    # the first worker also hands back the target's head (the hidden format stores it)
    shards = [
        (paths, cfg, parts[a:b], folder, ctx.trust.target, i == 0 and cfg.format == "hidden")
        for i, (a, b) in enumerate(bounds)
    ]
    done = map_shards(target_output_parts, shards, cfg.resources, ctx)
    rows = [row for shard_rows, _ in done for row in shard_rows]
    if cfg.format == "topk":
        vocab = len(tokenizer)  # the ids KD compares over (head rows past them are padding)
        k = min(cfg.k, vocab)
        if k < cfg.k:
            print(f"target_outputs: k={cfg.k} is above the vocabulary's {vocab} ids: storing all")
        rows = [TopkTargets(*row) for row in rows]
        info = write_topk_outputs(ctx.out, rows, k=k, vocab=vocab, temperature=cfg.temperature)
        return {**info, "workers": len(shards)}
    head = done[0][1]
    info = write_target_outputs(ctx.out, rows, head)
    return {
        **info,
        "hidden_size": int(head.shape[1]),
        "vocab": int(head.shape[0]),
        "dtype": cfg.precision,
        "head_dtype": str(head.dtype).removeprefix("torch."),
        "workers": len(shards),
    }


def target_output_parts(
    inputs: dict[str, str],
    cfg: TargetOutputsConfig,
    parts: list[tuple[int, int]],
    folder: str | None,
    trust: bool,
    with_head: bool = False,
) -> tuple[list, torch.Tensor | None]:
    """One worker's share: the target's rows (hidden states, or top-k tuples) for the sequences
    of `parts`, in order, each part read from or saved to `folder` (the stage's checkpoint
    directory) when this machine has it; and with `with_head` the target's (V, H) LM head on
    the CPU (else None)."""
    found = {k: Path(v) for k, v in inputs.items()}
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(found["target"], trust_remote_code=trust)
    target = load_model_artifact(found["target"], device, trust_remote_code=trust).eval()
    # the stored path multiplies these hidden states by the head weight and nothing else
    refuse_logit_transforms(target, "target")
    sequences = load_sequences(found["generate"]).select_columns(["input_ids", "response_mask"])
    pad_id = tokenizer.pad_token_id
    if cfg.format == "topk":
        vocab = len(tokenizer)

        def compute(part):
            return target_topk_rows(target, part, pad_id, cfg, vocab=vocab)
    else:

        def compute(part):
            return target_hidden_rows(target, part, pad_id, cfg.batch_size, cfg.precision)[0]

    here = Path(folder) if folder is not None and Path(folder).is_dir() else None
    head = target.get_output_embeddings().weight.detach().cpu() if with_head else None
    return rows_in_parts(sequences, compute, here, parts), head


PART_SEQUENCES = 512  # sequences per resumable part


def part_bounds(n: int) -> list[tuple[int, int]]:
    """(start, end) of the resumable parts of PART_SEQUENCES sequences covering range(n)."""
    return [(a, min(a + PART_SEQUENCES, n)) for a in range(0, n, PART_SEQUENCES)]


def rows_in_parts(
    sequences, compute, folder: Path | None, bounds: list[tuple[int, int]] | None = None
) -> list:
    """`compute(sequences)` (a row per sequence: a tensor or a tuple of tensors) over the parts
    `bounds` (default: every part, part_bounds), in order. With `folder` (the stage's checkpoint
    directory) each finished part is saved there and read back, not computed, on a later
    attempt."""
    rows: list = []
    bounds = part_bounds(len(sequences)) if bounds is None else bounds
    reused = 0
    for a, b in tqdm(bounds, desc="target outputs: parts", disable=len(bounds) < 2):
        path = None if folder is None else Path(folder) / f"part-{a:07d}-{b:07d}.safetensors"
        part = _read_part(path, b - a)
        reused += 0 if part is None else b - a
        if part is None:
            part = compute(sequences.select(range(a, b)))
            if path is not None:
                _write_part(path, part)
        rows += part
    if reused:
        print(f"target_outputs: {reused} sequences' rows read back from a previous attempt")
    return rows


def _write_part(path: Path, rows: list) -> None:
    """Save one part's rows (each a tensor, or a tuple of tensors of one length) atomically."""
    from safetensors.torch import save_file

    fields = (
        [list(column) for column in zip(*rows, strict=True)]
        if isinstance(rows[0], tuple)
        else [rows]
    )
    tensors = {"lengths": torch.tensor([len(field_row) for field_row in fields[0]])}
    for i, column in enumerate(fields):
        tensors[f"field{i}"] = torch.cat(column).contiguous()
    metadata = {"tuple": str(isinstance(rows[0], tuple))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _read_part(path: Path | None, n: int) -> list | None:
    """A saved part's rows, or None when there is none or it cannot be read whole (run it again)."""
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            lengths = f.get_tensor("lengths").tolist()
            is_tuple = (f.metadata() or {}).get("tuple") == "True"
            names = sorted((k for k in f.keys() if k != "lengths"), key=lambda k: int(k[5:]))
            columns = [f.get_tensor(k).split(lengths) for k in names]
    except Exception as e:  # noqa: BLE001 - a damaged part is made again
        print(f"target_outputs: {path.name} cannot be read ({e}): running it again")
        return None
    if len(lengths) != n or not columns:
        return None
    return [tuple(row) for row in zip(*columns, strict=True)] if is_tuple else list(columns[0])


def target_hidden_rows(
    target, sequences, pad_id: int, batch_size: int, precision: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per sequence, the target's final hidden states at its response-predicting positions
    ((n_r, H), bf16 or fp32 by `precision`, on the CPU), and the target's (V, H) LM head. The
    forward runs as the live KD path runs it: padded batches, bf16 autocast when asked."""
    stored_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows: list[torch.Tensor] = []
    for batch_rows in _response_hidden_batches(target, sequences, pad_id, batch_size, precision):
        rows += [hidden.to(stored_dtype).cpu() for hidden in batch_rows]
    return rows, target.get_output_embeddings().weight.detach()


def target_topk_rows(target, sequences, pad_id: int, cfg, *, vocab: int) -> list[TopkTargets]:
    """Per sequence, the target's top-`cfg.k` (at most `vocab`) ids among the tokenizer's `vocab`
    ids at its response-predicting positions, their log-probabilities at `cfg.temperature` and
    the log of the rest (stored_target_outputs.topk_log_probs), on the CPU. The forward runs as
    target_hidden_rows's; the logits in fp32."""
    head = target.get_output_embeddings().weight.detach()[:vocab]  # (V, H)
    k = min(cfg.k, vocab)
    rows: list[TopkTargets] = []
    batches = _response_hidden_batches(target, sequences, pad_id, cfg.batch_size, cfg.precision)
    for batch_rows in batches:
        lengths = [hidden.shape[0] for hidden in batch_rows]
        top = topk_log_probs(torch.cat(batch_rows), head, k, cfg.temperature)
        parts = [t.cpu().split(lengths) for t in top]
        rows += [TopkTargets(*row) for row in zip(*parts, strict=True)]
    return rows


def _response_hidden_batches(target, sequences, pad_id: int, batch_size: int, precision: str):
    """Per batch of `batch_size` sequences, a list of each sequence's final hidden states at its
    response-predicting positions ((n_r, H) on the target's device, in the forward's dtype):
    padded batches, bf16 autocast when `precision` is bf16."""
    device = next(target.parameters()).device
    collate = Collator(pad_id)
    for start in tqdm(range(0, len(sequences), batch_size), desc="target outputs"):
        end = min(start + batch_size, len(sequences))
        batch = collate(list(sequences.select(range(start, end))))
        batch = {k: v.to(device) for k, v in batch.items()}
        counted = response_positions(batch)  # (B, T-1)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            hidden, _ = hidden_and_head(target, batch["input_ids"], batch["attention_mask"])
        hidden = hidden[:, :-1]  # (B, T-1, H)
        yield [hidden[i][counted[i]].clone() for i in range(hidden.shape[0])]
