"""The target_outputs stage's files and how training reads them, in one of two formats
(target_outputs.format):

- `hidden`: the frozen target's final hidden states at the response-predicting positions of each
  training sequence, and its LM head; training multiplies them again (exact, H values a token).
- `topk`: per such position the target's k most likely token ids and their log-probabilities at
  the distillation temperature, and the log of the mass left outside them (6k + 2 bytes a token,
  independent of the target's width); the KD loss compares the draft over those ids and one
  bucket for the rest (kernels/kd_loss.py, fused_topk_kd_loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from specdraft.kernels.kd_loss import TopkTargets

# The target_outputs stage's files. format=hidden: hidden-<i>-of-<n>.safetensors shards, each with
# `hidden` (M_i, H), the rows' response-predicting positions end to end, and `tokens` (R_i,), how
# many positions each of its rows has; head.safetensors with the target's LM head `weight` (V, H).
# format=topk: topk-<i>-of-<n>.safetensors shards with `ids` (M_i, k) int32, `logprobs` (M_i, k)
# fp16, `log_rest` (M_i,) fp16 and `tokens` (R_i,); their metadata holds k, the vocabulary size V
# and the temperature.
HIDDEN_SHARD = "hidden-{index:05d}-of-{count:05d}.safetensors"
TOPK_SHARD = "topk-{index:05d}-of-{count:05d}.safetensors"
HEAD_FILE = "head.safetensors"
SHARD_BYTES = 2**30  # stored bytes per shard file
# fp16, not bf16, for the log-probabilities: they lie in [-65504, 0], where fp16's 10 mantissa bits
# round a log-probability of -4 to within 0.002 (bf16: 0.016); -inf (an empty tail) is kept.
TOPK_VALUE_DTYPE = torch.float16
# Rows of (rows, V) fp32 logits at once while taking the top-k: 256 MiB.
TOPK_CHUNK_BYTES = 256 * 2**20


def topk_bytes_per_token(k: int) -> int:
    """Stored bytes per token with format=topk: k int32 ids, k fp16 log-probabilities and the
    fp16 log of the rest."""
    return 4 * k + 2 * k + 2


def _grouped(rows: list, nbytes) -> list[list]:
    """`rows` in order, cut into groups of at most SHARD_BYTES (`nbytes(row)` each; a row larger
    than that is a group of its own)."""
    groups: list[list] = [[]]
    size = 0
    for row in rows:
        if groups[-1] and size + nbytes(row) > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(row)
        size += nbytes(row)
    return groups


def write_target_outputs(folder: Path, rows: list[torch.Tensor], head: torch.Tensor) -> dict:
    """Save per-row hidden states `rows` ((n_r, H) each, in sequence order) as shards of at most
    SHARD_BYTES, and the LM head. Returns what the stage's manifest records."""
    from safetensors.torch import save_file

    groups = _grouped(rows, lambda hidden: hidden.nbytes)
    width = head.shape[1]
    files = []
    for index, group in enumerate(groups):
        name = HIDDEN_SHARD.format(index=index, count=len(groups))
        hidden = torch.cat(group) if group else torch.empty(0, width, dtype=head.dtype)
        tokens = torch.tensor([h.shape[0] for h in group], dtype=torch.long)
        save_file({"hidden": hidden.contiguous(), "tokens": tokens}, str(folder / name))
        files.append(name)
    save_file({"weight": head.detach().contiguous().cpu()}, str(folder / HEAD_FILE))
    itemsize = rows[0].element_size() if rows else head.element_size()
    return {
        "format": "hidden",
        "shards": files,
        "rows": len(rows),
        "tokens": sum(h.shape[0] for h in rows),
        "bytes_per_token": width * itemsize,
    }


@torch.no_grad()
def topk_log_probs(
    hidden: torch.Tensor, head: torch.Tensor, k: int, temperature: float
) -> TopkTargets:
    """The target's top-k at the positions `hidden` (M, H) with its head `head` (V, H), both
    in fp32: ids (M, k) int32, log_softmax(h W^T / T) at them (M, k) and the log of the mass
    outside them (M,) (-inf at k = V), in TOPK_VALUE_DTYPE. (rows, V) logits at a time."""
    head = head.float()
    vocab = head.shape[0]
    chunk = max(1, TOPK_CHUNK_BYTES // (4 * vocab))
    ids, values, rest = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = torch.mm(hidden[start : start + chunk].float(), head.t())  # (C, V)
        log_probs = torch.log_softmax(logits.div_(temperature), dim=-1)
        top = torch.topk(log_probs, k, dim=-1, sorted=True)
        tail = log_probs.scatter_(1, top.indices, -math.inf).logsumexp(dim=-1)  # (C,)
        ids.append(top.indices.int())
        values.append(top.values.to(TOPK_VALUE_DTYPE))
        rest.append(tail.to(TOPK_VALUE_DTYPE))
    if not ids:
        return _no_topk(k)
    return TopkTargets(torch.cat(ids), torch.cat(values), torch.cat(rest))


def _no_topk(k: int) -> TopkTargets:
    """A TopkTargets of no positions."""
    values = torch.empty(0, k, dtype=TOPK_VALUE_DTYPE)
    return TopkTargets(torch.empty(0, k, dtype=torch.int32), values, values[:, 0])


def write_topk_outputs(
    folder: Path, rows: list[TopkTargets], *, k: int, vocab: int, temperature: float
) -> dict:
    """Save per-row top-k `rows` (each a TopkTargets of (n_r, k), in sequence order) as shards
    of at most SHARD_BYTES. Returns what the stage's manifest records, the mean and largest mass
    outside the stored ids among it (what k leaves out)."""
    from safetensors.torch import save_file

    per_token = topk_bytes_per_token(k)
    groups = _grouped(rows, lambda row: row.ids.shape[0] * per_token)
    metadata = {
        "format": "topk",
        "k": str(k),
        "vocab": str(vocab),
        "temperature": repr(temperature),
    }
    files = []
    for index, group in enumerate(groups):
        name = TOPK_SHARD.format(index=index, count=len(groups))
        parts = TopkTargets(*map(torch.cat, zip(*group, strict=True))) if group else _no_topk(k)
        tokens = torch.tensor([row.ids.shape[0] for row in group], dtype=torch.long)
        tensors = {
            name_: t.contiguous() for name_, t in zip(TopkTargets._fields, parts, strict=True)
        }
        save_file({**tensors, "tokens": tokens}, str(folder / name), metadata=metadata)
        files.append(name)
    rest = torch.cat([row.log_rest for row in rows]).float().exp() if rows else torch.zeros(0)
    return {
        "format": "topk",
        "shards": files,
        "rows": len(rows),
        "tokens": int(rest.numel()),
        "k": k,
        "vocab": vocab,
        "temperature": temperature,
        "bytes_per_token": per_token,
        "tail_mass_mean": float(rest.mean()) if rest.numel() else 0.0,
        "tail_mass_max": float(rest.max()) if rest.numel() else 0.0,
    }


def _shards(folder: Path, pattern: str) -> list[Path]:
    """The shards `pattern` names in `folder`, all of them or FileNotFoundError."""
    shards = sorted(Path(folder).glob(pattern))
    expected = int(shards[0].name.split("-of-")[1].split(".")[0]) if shards else 0
    if not shards or len(shards) != expected:
        kind = pattern.split("-")[0]
        raise FileNotFoundError(f"{folder}: {len(shards)} of {expected or '?'} {kind} shards")
    return shards


class _StoredRows:
    """Per-position tensors of the stored sequences end to end, and where each sequence's
    positions start (`offsets`: row r is offsets[r]..offsets[r+1])."""

    def __init__(self, tokens: torch.Tensor):
        self.offsets = [0, *torch.cumsum(tokens.long(), 0).tolist()]

    def _select(self, rows: torch.Tensor, counted: torch.Tensor, tensors) -> list[torch.Tensor]:
        """Each of `tensors` (M, ...) at the stored rows `rows` (B,) end to end; `counted`
        (B, T-1) is the batch's response_positions (pipeline/batches.py), checked against what
        was stored for each row."""
        per_row = counted.sum(dim=1).tolist() if counted.shape[0] == rows.numel() else None
        spans = []
        for i, r in enumerate(rows.tolist()):
            start, end = self.offsets[r], self.offsets[r + 1]
            if per_row is not None and per_row[i] != end - start:
                raise RuntimeError(
                    f"stored target outputs of sequence {r} have {end - start} positions, the "
                    f"batch has {per_row[i]}: they were made from other sequences"
                )
            spans.append((start, end))
        picked = [torch.cat([t[a:b] for a, b in spans]) if spans else t[:0] for t in tensors]
        if picked[0].shape[0] != int(counted.sum()):
            raise RuntimeError(
                f"stored target outputs hold {picked[0].shape[0]} positions for this batch, it "
                f"has {int(counted.sum())}: they were made from other sequences"
            )
        return picked


class StoredTargetOutputs(_StoredRows):
    """format=hidden: the frozen target's final hidden states (after its last norm, before the
    LM head) at the positions that predict a response token of each training sequence, and its
    LM head: what KD reads instead of running the target (the target_outputs stage makes them).
    The hidden states stay on the CPU in their stored dtype; a batch's rows come to the head's
    device and dtype, which is what the live path's hidden states have."""

    def __init__(self, hidden: torch.Tensor, tokens: torch.Tensor, head: torch.Tensor):
        super().__init__(tokens)
        self.hidden = hidden  # (M, H)
        self.head = head  # (V, H)

    @classmethod
    def load(cls, folder: Path, device="cpu") -> StoredTargetOutputs:
        from safetensors.torch import load_file

        parts = [load_file(str(p)) for p in _shards(folder, "hidden-*-of-*.safetensors")]
        head = load_file(str(Path(folder) / HEAD_FILE))["weight"].to(device)
        return cls(
            torch.cat([p["hidden"] for p in parts]), torch.cat([p["tokens"] for p in parts]), head
        )

    @property
    def vocab(self) -> int:
        return self.head.shape[0]

    def response_hidden(self, rows: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """(N, H): the stored rows `rows` (B,) end to end (see _StoredRows._select)."""
        (hidden,) = self._select(rows, counted, (self.hidden,))
        return hidden.to(device=self.head.device, dtype=self.head.dtype, non_blocking=True)

    def targets(self, rows: torch.Tensor, counted: torch.Tensor, vocab: int | None):
        """The target of a batch as the KD loss takes it: (N, H) hidden states and the head's
        first `vocab` rows (all of them when None)."""
        head = self.head if vocab is None else self.head[:vocab]
        return self.response_hidden(rows, counted), head


class StoredTopkOutputs(_StoredRows):
    """format=topk: per response-predicting position the target's k most likely ids, their
    log-probabilities at `temperature` and the log of the mass outside them, over a vocabulary
    of `vocab` ids. Kept on the CPU; a batch's rows come to `device`."""

    def __init__(self, target: TopkTargets, tokens, *, vocab: int, temperature: float, device):
        super().__init__(tokens)
        self.target, self.vocab, self.temperature = target, vocab, temperature
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: Path, device="cpu") -> StoredTopkOutputs:
        from safetensors import safe_open
        from safetensors.torch import load_file

        shards = _shards(folder, "topk-*-of-*.safetensors")
        with safe_open(str(shards[0]), framework="pt") as first:
            meta = first.metadata() or {}
        parts = [load_file(str(p)) for p in shards]
        target = TopkTargets(*(torch.cat([p[f] for p in parts]) for f in TopkTargets._fields))
        vocab = int(meta["vocab"])
        if target.ids.numel() and not 0 <= int(target.ids.min()) <= int(target.ids.max()) < vocab:
            raise RuntimeError(f"{folder}: stored token ids outside the vocabulary of {vocab}")
        return cls(
            target,
            torch.cat([p["tokens"] for p in parts]),
            vocab=vocab,
            temperature=float(meta["temperature"]),
            device=device,
        )

    @property
    def k(self) -> int:
        return self.target.ids.shape[1]

    @property
    def head(self) -> torch.Tensor:
        """A (V, 0) stand-in for the LM head a hidden-state store has: no weights, only its
        row count, the vocabulary the top-k was taken over (what the vocabulary checks read)."""
        return torch.empty(self.vocab, 0)

    def targets(
        self,
        rows: torch.Tensor,
        counted: torch.Tensor,
        vocab: int | None,
        into: torch.Tensor | None = None,
    ):
        """The target of a batch as the KD loss takes it: (TopkTargets of (N, k), None).

        `into` ((I,) target ids, in the order of a draft head's rows: a trimmed draft's kept ids,
        the intersection of another tokenizer's) maps each stored id to its row there, or to -1
        where the draft's vocabulary lacks it: the loss drops the target's mass on those ids and
        compares the rest renormalised, as the hidden-state path compares the target restricted
        to the draft's rows (mapped_topk)."""
        if vocab is not None and vocab != self.vocab:
            raise RuntimeError(
                f"the stored top-k is over {self.vocab} token ids, the tokenizer has {vocab}: "
                "they were made with another tokenizer"
            )
        picked = self._select(rows, counted, self.target)
        if into is not None:
            picked = mapped_topk(TopkTargets(*picked), into, self.vocab)
        moved = (t.to(self.device, non_blocking=True) for t in picked)
        return TopkTargets(*moved), None


def topk_prefix(target: TopkTargets, k: int) -> TopkTargets:
    """`target` (stored sorted, most likely first) as if stored at `k` ids: its first k, and the
    log of the rest with the mass of the ids after the k-th folded in (summed in fp32, stored
    back in the values' dtype). `target` itself when it holds no more than k."""
    if target.ids.shape[1] <= k:
        return target
    dropped = target.logprobs[:, k:].float()  # (M, k_stored - k)
    rest = torch.cat([target.log_rest.float()[:, None], dropped], dim=1).logsumexp(dim=1)
    return TopkTargets(
        target.ids[:, :k].contiguous(),
        target.logprobs[:, :k].contiguous(),
        rest.to(target.log_rest.dtype),
    )


def mapped_topk(target: TopkTargets, into: torch.Tensor, vocab: int) -> TopkTargets:
    """`target`'s stored ids (over `vocab` target ids) as rows of a head whose row i is target id
    into[i]; an id the head lacks becomes -1 (kernels.kd_loss: no outcome of its own). The tail
    (the mass outside the stored ids) is kept whole: the loss counts it as the draft's mass on
    its rows outside the stored ids, an upper bound, since part of it may lie on ids the draft
    lacks (exact when k covers the vocabulary)."""
    index = torch.full((vocab,), -1, dtype=torch.long)  # (V_t,): target id -> draft row
    into = into.to("cpu", torch.long)
    index[into] = torch.arange(len(into))
    ids = index[target.ids.to("cpu", torch.long)].to(target.ids.dtype)  # (N, k)
    return TopkTargets(ids, target.logprobs, target.log_rest)


def load_target_outputs(
    folder: Path, device="cpu", *, temperature: float | None, k: int = 0
) -> StoredTargetOutputs | StoredTopkOutputs:
    """The target_outputs artifact `folder` in the format it was written in. `temperature` is
    the one the reader's losses use: a top-k stored at another is refused (its log-probabilities
    are at one temperature; hidden states serve any); None takes a top-k's own. `k` > 0 reads a top-k store's first k ids
    a token (topk_prefix): one store at a larger k serves every smaller one; a hidden-state store
    or a top-k one with fewer ids is refused (ValueError)."""
    if not any(Path(folder).glob("topk-*-of-*.safetensors")):
        if k:
            raise ValueError(
                f"{folder}: distil.stored_k={k} reads a top-k store; this one holds hidden "
                "states (target_outputs.format=hidden)"
            )
        return StoredTargetOutputs.load(folder, device)
    stored = StoredTopkOutputs.load(folder, device)
    if temperature is not None and not math.isclose(stored.temperature, temperature):
        raise ValueError(
            f"{folder}: the stored top-k is at temperature {stored.temperature}, this stage "
            f"distils at {temperature}"
        )
    if k > stored.k:
        raise ValueError(
            f"{folder}: distil.stored_k={k}, but the store holds {stored.k} ids a token "
            f"(target_outputs.k); set distil.stored_k <= {stored.k}"
        )
    if k:
        stored.target = topk_prefix(stored.target, k)
    return stored
