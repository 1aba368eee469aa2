"""The target_outputs stage's files and how training reads them: the frozen target's final hidden
states at the response-predicting positions of each training sequence, and its LM head."""

from __future__ import annotations

from pathlib import Path

import torch

# The target_outputs stage's files: hidden-<i>-of-<n>.safetensors shards, each with `hidden`
# (M_i, H), the rows' response-predicting positions end to end, and `tokens` (R_i,), how many
# positions each of its rows has; head.safetensors with the target's LM head `weight` (V, H).
HIDDEN_SHARD = "hidden-{index:05d}-of-{count:05d}.safetensors"
HEAD_FILE = "head.safetensors"
SHARD_BYTES = 2**30  # hidden-state bytes per shard file


def write_target_outputs(folder: Path, rows: list[torch.Tensor], head: torch.Tensor) -> dict:
    """Save per-row hidden states `rows` ((n_r, H) each, in sequence order) as shards of at most
    SHARD_BYTES, and the LM head. Returns what the stage's manifest records."""
    from safetensors.torch import save_file

    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for hidden in rows:
        if groups[-1] and size + hidden.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(hidden)
        size += hidden.nbytes
    width = head.shape[1]
    files = []
    for index, group in enumerate(groups):
        name = HIDDEN_SHARD.format(index=index, count=len(groups))
        hidden = torch.cat(group) if group else torch.empty(0, width, dtype=head.dtype)
        tokens = torch.tensor([h.shape[0] for h in group], dtype=torch.long)
        save_file({"hidden": hidden.contiguous(), "tokens": tokens}, str(folder / name))
        files.append(name)
    save_file({"weight": head.detach().contiguous().cpu()}, str(folder / HEAD_FILE))
    return {"shards": files, "rows": len(rows), "tokens": sum(h.shape[0] for h in rows)}


class StoredTargetOutputs:
    """The frozen target's final hidden states (after its last norm, before the LM head) at the
    positions that predict a response token of each training sequence, and its LM head: what KD
    reads instead of running the target (the target_outputs stage makes them). The hidden
    states stay on the CPU in their stored dtype; a batch's rows come to the head's device and
    dtype, which is what the live path's hidden states have."""

    def __init__(self, hidden: torch.Tensor, tokens: torch.Tensor, head: torch.Tensor):
        self.hidden = hidden  # (M, H)
        self.offsets = [
            0,
            *torch.cumsum(tokens.long(), 0).tolist(),
        ]  # row r: offsets[r]..offsets[r+1]
        self.head = head  # (V, H)

    @classmethod
    def load(cls, folder: Path, device="cpu") -> StoredTargetOutputs:
        from safetensors.torch import load_file

        shards = sorted(Path(folder).glob("hidden-*-of-*.safetensors"))
        expected = int(shards[0].name.split("-of-")[1].split(".")[0]) if shards else 0
        if not shards or len(shards) != expected:
            raise FileNotFoundError(f"{folder}: {len(shards)} of {expected or '?'} hidden shards")
        parts = [load_file(str(p)) for p in shards]
        head = load_file(str(Path(folder) / HEAD_FILE))["weight"].to(device)
        return cls(
            torch.cat([p["hidden"] for p in parts]), torch.cat([p["tokens"] for p in parts]), head
        )

    def response_hidden(self, rows: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """(N, H): the stored rows `rows` (B,) end to end; `counted` (B, T-1) is the batch's
        response_positions (pipeline/batches.py), checked against what was stored for each row."""
        per_row = counted.sum(dim=1).tolist() if counted.shape[0] == rows.numel() else None
        parts = []
        for i, r in enumerate(rows.tolist()):
            start, end = self.offsets[r], self.offsets[r + 1]
            if per_row is not None and per_row[i] != end - start:
                raise RuntimeError(
                    f"stored target outputs of sequence {r} have {end - start} positions, the "
                    f"batch has {per_row[i]}: they were made from other sequences"
                )
            parts.append(self.hidden[start:end])
        hidden = torch.cat(parts) if parts else self.hidden[:0]
        if hidden.shape[0] != int(counted.sum()):
            raise RuntimeError(
                f"stored target outputs hold {hidden.shape[0]} positions for this batch, it has "
                f"{int(counted.sum())}: they were made from other sequences"
            )
        return hidden.to(device=self.head.device, dtype=self.head.dtype, non_blocking=True)
