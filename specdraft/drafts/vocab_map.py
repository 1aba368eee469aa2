"""Target and draft ids mapped through their tokenizers' common token strings, as vLLM serves a
draft whose vocabulary differs from the target's (`speculative_config.use_heterogeneous_vocab`,
vLLM 0.32's `vllm/v1/spec_decode/vocab_mapping.py`):

- each tokenizer's space marker is probed from its encoding of " a" (the first token's string
  without its final "a", when that is longer than one character and starts with neither a space
  nor a tab); a tokenizer that gives nothing usable normalises both `Ġ` (U+0120, byte-level BPE)
  and `▁` (U+2581, SentencePiece);
- a token string that starts with its tokenizer's marker is normalised to " " + the rest; of two
  strings that normalise alike the first in `get_vocab()` order keeps the id;
- the intersection is the normalised strings both vocabularies hold, with ids below each model's
  vocab_size; a target token outside it reaches the draft as the draft's unk (its eos when it has
  no unk), a draft token outside it maps to the target's unk (or eos);
- the draft's logits are masked to the intersection (-inf elsewhere) and it drafts greedily.

specdraft trains a draft with another vocabulary on what it will see when served (its context
mapped by `to_draft`) and measures its acceptance through the same mapping and mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdraft.errors import InputError

SPACE_MARKERS = ("\u0120", "\u2581")  # Ġ (byte-level BPE), ▁ (SentencePiece)


def space_prefixes(tokenizer) -> tuple[str, ...]:
    """The space marker(s) `tokenizer`'s strings start a word with, probed as vLLM does."""
    try:
        ids = tokenizer.encode(" a", add_special_tokens=False)
        if ids:
            token = tokenizer.convert_ids_to_tokens(ids[0])
            if (
                isinstance(token, str)
                and len(token) > 1
                and token.endswith("a")
                and token[0] not in (" ", "\t")
            ):
                return (token[:-1],)
    except Exception:  # vLLM falls back on any failure of the probe, and so must we
        pass
    return SPACE_MARKERS


def normalize_token(token: str, prefixes: tuple[str, ...]) -> str:
    """`token` with a leading space marker (the first of `prefixes` it starts with) made " "."""
    for prefix in prefixes:
        if token.startswith(prefix):
            return " " + token[len(prefix) :]
    return token


def normalized_vocabulary(tokenizer) -> dict[str, int]:
    """{normalised token string: id}, the first id in `get_vocab()` order keeping a string."""
    prefixes = space_prefixes(tokenizer)
    normalized: dict[str, int] = {}
    for token, token_id in tokenizer.get_vocab().items():
        normalized.setdefault(normalize_token(token, prefixes), token_id)
    return normalized


def fallback_id(tokenizer, role: str) -> int:
    """The id an unmapped token becomes on `role`'s side: its unk, else its eos."""
    for name in ("unk_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise InputError(
        f"the {role} tokenizer has neither an unk nor an eos token: a mapped vocabulary needs one "
        "for the tokens outside the intersection"
    )


@dataclass
class VocabularyMap:
    """The served view of a (target, draft) pair whose vocabularies differ. Ids outside the
    intersection are -1 in the tables and become the other side's fallback id when mapped."""

    target_to_draft: torch.Tensor  # (V_t,) long, -1 outside the intersection
    draft_to_target: torch.Tensor  # (V_d,) long, -1 outside the intersection
    target_fallback_id: int  # the target's unk (or eos)
    draft_fallback_id: int  # the draft's unk (or eos)

    @property
    def draft_mask(self) -> torch.Tensor:
        """(V_d,) bool: the draft ids in the intersection (the logits vLLM keeps)."""
        return self.draft_to_target >= 0

    @property
    def intersection(self) -> int:
        return int(self.draft_mask.sum())

    def intersection_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft ids, target ids) of the intersection, (I,) each, in draft-id order: the head
        rows distillation compares."""
        draft_ids = torch.nonzero(self.draft_mask).view(-1)
        return draft_ids, self.draft_to_target[draft_ids]

    def coverage(self, target_counts: torch.Tensor) -> float:
        """The share of target tokens inside the intersection, from (V_t,) counts per target id
        (ids past the target's rows count as outside); nan for no tokens."""
        counts = target_counts[: len(self.target_to_draft)]
        covered = counts[self.target_to_draft[: len(counts)] >= 0].sum()
        total = target_counts.sum()
        return float(covered) / float(total) if total else float("nan")

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids (any shape) as the draft sees them: outside the intersection its unk."""
        mapped = self.target_to_draft.to(target_ids.device)[target_ids]
        return torch.where(mapped >= 0, mapped, self.draft_fallback_id).to(target_ids.dtype)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids (any shape) as target ids: outside the intersection the target's unk."""
        mapped = self.draft_to_target.to(draft_ids.device)[draft_ids]
        return torch.where(mapped >= 0, mapped, self.target_fallback_id).to(draft_ids.dtype)

    def mask_draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V_d) draft logits with every id outside the intersection at -inf."""
        return logits.masked_fill(~self.draft_mask.to(logits.device), float("-inf"))

    def greedy_draft(self, logits: torch.Tensor) -> torch.Tensor:
        """The target ids a server drafts from (..., V_d) draft logits: the argmax over the
        intersection, mapped back (vLLM drafts a mapped vocabulary greedily only)."""
        return self.to_target(self.mask_draft_logits(logits).argmax(dim=-1))


def served_vocabulary_map(
    target_tokenizer, draft_tokenizer, target_vocab_size: int, draft_vocab_size: int
) -> VocabularyMap:
    """The id mapping vLLM 0.32 builds for `use_heterogeneous_vocab` (module docstring) between
    tokenizers of models with `target_vocab_size` and `draft_vocab_size` embedding rows (their
    config's vocab_size: ids at or past them are left out, as vLLM leaves them)."""
    target_fallback = fallback_id(target_tokenizer, "target")
    draft_fallback = fallback_id(draft_tokenizer, "draft")
    target = normalized_vocabulary(target_tokenizer)
    draft = normalized_vocabulary(draft_tokenizer)
    target_to_draft = torch.full((target_vocab_size,), -1, dtype=torch.long)
    draft_to_target = torch.full((draft_vocab_size,), -1, dtype=torch.long)
    for token in target.keys() & draft.keys():
        t_id, d_id = target[token], draft[token]
        if t_id < target_vocab_size and d_id < draft_vocab_size:
            target_to_draft[t_id] = d_id
            draft_to_target[d_id] = t_id
    return VocabularyMap(target_to_draft, draft_to_target, target_fallback, draft_fallback)


class ServedDraft(torch.nn.Module):
    """A draft with its own vocabulary seen from the target's side, as a serving engine runs it
    (vLLM's use_heterogeneous_vocab): target ids in, each mapped to the draft's (outside the
    intersection: the draft's unk), and logits out over the target's `target_vocab` ids, the
    draft's intersection rows placed at their target ids and -inf everywhere else. So its argmax is
    the masked argmax mapped back (what the engine drafts), and softmax puts no mass outside the
    intersection. Speculative decoding, greedy agreement and acceptance then run on it unchanged.

    `forward` takes the cache under either name (`cache`, `past_key_values`) and hands it to the
    draft under the draft's own; logits_to_keep is passed on when the draft takes it."""

    def __init__(self, draft: torch.nn.Module, vmap: VocabularyMap, target_vocab: int):
        import inspect

        super().__init__()
        self.draft, self.vmap, self.target_vocab = draft, vmap, target_vocab
        draft_ids, target_ids = vmap.intersection_rows()
        self.register_buffer("draft_ids", draft_ids, persistent=False)
        self.register_buffer("target_ids", target_ids, persistent=False)
        parameters = inspect.signature(draft.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_logits = "logits_to_keep" in parameters

    @property
    def config(self):
        """The draft's config (its KV cache is built from it)."""
        return self.draft.config

    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        past_key_values=None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        given = cache if cache is not None else past_key_values
        if given is not None:
            kwargs[self._cache_name] = given
        if self._keeps_logits and logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.draft(input_ids=self.vmap.to_draft(input_ids), **kwargs)
        logits = out.logits
        if logits_to_keep and not self._keeps_logits:
            logits = logits[:, -logits_to_keep:]
        full = logits.new_full((*logits.shape[:-1], self.target_vocab), float("-inf"))
        full[..., self.target_ids] = logits[..., self.draft_ids]
        out.logits = full
        return out
