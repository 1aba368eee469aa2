"""Speculative decoding: a draft model proposes up to γ tokens, the target verifies them in one pass.

Both models keep a KV cache (transformers ``DynamicCache`` or anything with ``get_seq_length`` and
``crop``); on rejection the caches are rolled back with ``cache.crop(-n)``, so neither model is ever
re-fed the prefix. Any HF causal LM works: models are called as
``model(input_ids=..., cache=cache, use_cache=True)`` and return ``.logits`` and ``.cache``
(transformers' current names); a model whose forward has no ``cache`` argument (older transformers,
remote code) is called with ``past_key_values=`` and read back the same way.

Verification (Leviathan et al. 2023, Chen et al. 2023):
- temperature == 0: accept drafted tokens while they equal the target's argmax; emit the target's
  argmax at the first mismatch, or the bonus argmax when all are accepted. The output is identical
  to target-only greedy decoding.
- temperature > 0: accept x ~ q with probability min(1, p(x)/q(x)); at the first rejection sample
  from norm(max(0, p - q)); when all are accepted sample the bonus from p. p and q are
  softmax(logits / temperature). The output is distributed exactly as target-only sampling.

Statistics (``SpecStats``), with the bonus token counted in τ:
- ``target_calls``: target forward passes. There is no separate prefill: the first verification
  pass carries the prompt, so every target call emits at least one token.
- ``tau = new_tokens / target_calls`` (block efficiency, bonus included; 1 ≤ τ ≤ γ + 1).
- ``spec_alpha = accepted / drafted`` (drafted counts every proposed token, also those after a
  rejection that were never looked at).
- ``per_position[i] = accepted_at[i] / drafted_at[i]``: the acceptance rate of drafted position
  i + 1 *given that positions 1..i were accepted* (``drafted_at`` counts only positions the
  verifier reached); NaN where a position was never reached.
- ``cost_ratio`` c = (seconds per draft forward pass) / (seconds per target forward pass), from
  the decoding itself (the first pass of each model carries the prompt). A batched pass is
  shared evenly by the rows in it: each row is charged seconds / rows and 1 / rows passes, so
  the merged stats of a batch count every pass once.

Near the end a round drafts ``min(γ, max_new_tokens - emitted - 1)`` tokens, so no more than
``max_new_tokens`` are produced (the same rule as transformers' assisted generation). The draft
stops drafting at eos, and output stops right after the first eos. All randomness comes from the
``generator`` argument, which must live on the models' device.

``speculative_generate_batch`` decodes a left-padded batch with per-row acceptance; each row gets
the tokens and counts that ``speculative_generate`` gives it alone (at temperature 0).

``vocab`` (the tokenizer's length) keeps the first ``vocab`` logits of both models: heads padded
past the tokenizer, to different sizes in target and draft (Qwen2.5-7B 152 064 rows, -0.5B
151 936), are compared over the real ids, and a padding id is never drafted nor emitted.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SpecStats",
    "SpeculativeDecoder",
    "autoregressive_generate",
    "autoregressive_generate_batch",
    "left_padded",
    "speculative_generate",
    "speculative_generate_batch",
]


@dataclass
class SpecStats:
    """Counters of a speculative run; see the module docstring for the definitions."""

    gamma: int
    drafted: int = 0  # draft tokens proposed (sum over rounds of tokens actually drafted)
    accepted: int = 0  # draft tokens accepted by the target
    target_calls: int = 0  # target forward passes (each one verifies and emits >= 1 token)
    new_tokens: int = 0  # tokens emitted: accepted + corrections + bonus tokens
    # (γ,) per drafted position i: rounds where it was accepted / reached by the verifier
    accepted_at: list[int] = field(default_factory=list)
    drafted_at: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    # forward passes; a batched pass counts 1 / rows for each row in it (its seconds likewise)
    draft_passes: float = 0.0
    target_passes: float = 0.0

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if not self.accepted_at:
            self.accepted_at = [0] * self.gamma
        if not self.drafted_at:
            self.drafted_at = [0] * self.gamma
        if len(self.accepted_at) != self.gamma or len(self.drafted_at) != self.gamma:
            raise ValueError("accepted_at and drafted_at must have length gamma")

    def merge(self, other: SpecStats) -> None:
        """Add the counts of ``other`` (a run with the same gamma) to these."""
        if other.gamma != self.gamma:
            raise ValueError(f"cannot merge stats of gamma {other.gamma} into gamma {self.gamma}")
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_calls += other.target_calls
        self.new_tokens += other.new_tokens
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at, strict=True)]
        self.drafted_at = [a + b for a, b in zip(self.drafted_at, other.drafted_at, strict=True)]
        self.draft_seconds += other.draft_seconds
        self.target_seconds += other.target_seconds
        self.draft_passes += other.draft_passes
        self.target_passes += other.target_passes

    @property
    def spec_alpha(self) -> float:
        """Accepted / drafted draft tokens (NaN before anything was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def alpha_verified(self) -> float:
        """Accepted / (accepted + rejections): only drafted tokens the verifier looked at."""
        verified = sum(self.drafted_at)
        return self.accepted / verified if verified else math.nan

    @property
    def tau(self) -> float:
        """Tokens emitted per target call, bonus included (NaN before any call)."""
        return self.new_tokens / self.target_calls if self.target_calls else math.nan

    @property
    def per_position(self) -> list[float]:
        """Acceptance rate of drafted position i+1 given 1..i were accepted (NaN: never reached)."""
        return [
            a / d if d else math.nan for a, d in zip(self.accepted_at, self.drafted_at, strict=True)
        ]

    @property
    def cost_ratio(self) -> float:
        """c: seconds per draft forward pass / seconds per target forward pass (NaN if unmeasured)."""
        if not (self.draft_passes and self.target_passes and self.target_seconds):
            return math.nan
        draft_step = self.draft_seconds / self.draft_passes
        return draft_step / (self.target_seconds / self.target_passes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters and derived metrics (NaN written as None)."""

        def finite(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "gamma": self.gamma,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "target_calls": self.target_calls,
            "new_tokens": self.new_tokens,
            "accepted_at": list(self.accepted_at),
            "drafted_at": list(self.drafted_at),
            "draft_seconds": self.draft_seconds,
            "target_seconds": self.target_seconds,
            "draft_passes": self.draft_passes,
            "target_passes": self.target_passes,
            "cost_ratio": finite(self.cost_ratio),
            "spec_alpha": finite(self.spec_alpha),
            "alpha_verified": finite(self.alpha_verified),
            "tau": finite(self.tau),
            "per_position": [finite(x) for x in self.per_position],
        }


# ---------------------------------------------------------------------------------------------
# Model calls and caches


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_argument(model: torch.nn.Module) -> str:
    """The name `model.forward` takes its KV cache under: `cache` in transformers >= 5.2x, whose
    `past_key_values` warns and goes in 5.40; `past_key_values` for models without `cache`."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(model: torch.nn.Module, out: Any) -> Any:
    """The KV cache a forward pass returned (`out.cache`, or `out.past_key_values` for models
    without `cache`: reading the old name on a current output logs a deprecation warning)."""
    cache = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(
            f"{type(model).__name__} returned no KV cache with use_cache=True; speculative "
            "decoding needs a KV cache that supports get_seq_length() and crop()."
        )
    return cache


def _cache_len(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def _record_past(cache: Any) -> None:
    """Keep every state a rollback may need: a sliding-window layer (Gemma-3) otherwise drops the
    states past its window at once and cannot be cropped back past them."""
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()


def _recording_cache(model: torch.nn.Module) -> Any:
    """An empty KV cache for `model` that records its past from the first forward (_record_past),
    or None (the model makes its own) where transformers has no such cache. The first forward
    already holds drafted tokens that a rollback may remove, so recording cannot wait for it."""
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    except Exception:  # no config, or a transformers without config-built caches
        return None
    if not hasattr(cache, "activate_past_recording"):
        return None
    _record_past(cache)
    return cache


def _crop_cache(cache: Any, length: int) -> None:
    """Roll ``cache`` back to its first ``length`` positions (a recording cache, see _record_past,
    is also trimmed back to the states its next forward needs)."""
    extra = _cache_len(cache) - length
    if extra > 0:
        # A negative argument removes that many positions, in transformers 4.x and 5.x alike.
        cache.crop(-extra)
    elif hasattr(cache, "activate_past_recording"):  # transformers 5.x: crop(0) trims, not empties
        cache.crop(0)


class _CachedLM:
    """One model plus its KV cache; ``feed`` appends tokens and returns the last ``keep`` logits."""

    def __init__(self, model: torch.nn.Module, vocab: int | None = None):
        self.model = model
        self.vocab = vocab  # logits kept per position: the tokenizer's ids (None: all)
        self.cache: Any = _recording_cache(model)
        self.seconds = 0.0
        self.calls = 0
        self._logits_to_keep = _accepts_logits_to_keep(model)
        self._cache_argument = _cache_argument(model)

    def __len__(self) -> int:
        return _cache_len(self.cache)

    def feed(self, input_ids: torch.LongTensor, keep: int) -> torch.Tensor:
        # input_ids: (1, L) -> logits (keep, V) for the last `keep` fed positions
        kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
        kwargs[self._cache_argument] = self.cache
        start = time.perf_counter()
        out = self.model(input_ids=input_ids, use_cache=True, **kwargs)
        logits = out.logits[0, -keep:, : self.vocab].float()  # (keep, V)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.cache = _returned_cache(self.model, out)
        _record_past(self.cache)
        return logits

    def rollback(self, length: int) -> None:
        _crop_cache(self.cache, length)


# ---------------------------------------------------------------------------------------------
# Sampling and verification of one row


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Argmax at temperature 0, else a sample from softmax(logits / temperature). logits: (V,)."""
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(_probs(logits, temperature), 1, generator=generator))


def _verify_greedy(drafted: torch.LongTensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """drafted: (K,), target_logits: (K+1, V). Returns (accepted count, next token)."""
    best = target_logits.argmax(dim=-1)  # (K+1,)
    matches = (drafted == best[: len(drafted)]).long()
    n_accepted = int(matches.cumprod(dim=0).sum())
    return n_accepted, int(best[n_accepted])


def _verify_sampled(
    drafted: torch.LongTensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Rejection sampling. drafted: (K,), draft_probs: (K, V), target_logits: (K+1, V)."""
    k = len(drafted)
    p = _probs(target_logits, temperature)  # (K+1, V)
    if k == 0:
        return 0, int(torch.multinomial(p[0], 1, generator=generator))
    if draft_probs.shape[-1] != p.shape[-1]:
        raise ValueError(
            f"draft vocab ({draft_probs.shape[-1]}) != target vocab ({p.shape[-1]}): sampled "
            "speculative decoding needs one vocabulary; use a draft with the target's vocab_size."
        )
    idx = torch.arange(k, device=drafted.device)
    p_x, q_x = p[idx, drafted], draft_probs[idx, drafted]  # (K,)
    u = torch.rand(k, generator=generator, device=p.device)
    # u < p/q, written without a division; q(x) > 0 because x was sampled from q.
    accept = (u * q_x < p_x).long()
    n_accepted = int(accept.cumprod(dim=0).sum())
    if n_accepted == k:
        residual = p[k]  # bonus token from the target
    else:
        residual = (p[n_accepted] - draft_probs[n_accepted]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: a rejection has probability ~0
            residual = p[n_accepted]
    return n_accepted, int(torch.multinomial(residual, 1, generator=generator))


def _cut_after_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1], True
    return tokens, False


def _record_round(stats: SpecStats, k: int, n_accepted: int, n_emitted: int) -> None:
    """Count one verification pass of one row that drafted k tokens and accepted n_accepted."""
    stats.target_calls += 1
    stats.drafted += k
    stats.accepted += n_accepted
    stats.new_tokens += n_emitted
    for i in range(min(n_accepted + 1, k)):  # positions the verifier reached
        stats.drafted_at[i] += 1
    for i in range(n_accepted):
        stats.accepted_at[i] += 1


def _eos_ids(eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _check_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}; "
            "decode a batch row by row."
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


# ---------------------------------------------------------------------------------------------
# Decoders


class SpeculativeDecoder:
    """Speculative decoding of one sequence, one draft-and-verify round per ``step()``.

    ``speculative_generate`` is a loop over ``step()``; the object is public so benchmarks and
    tests can look at the caches between rounds. State: ``tokens`` (1, T + emitted), the two cached
    models, and ``stats``.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        draft: torch.nn.Module,
        input_ids: torch.LongTensor,
        *,
        gamma: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        vocab: int | None = None,
    ):
        _check_args(input_ids, max_new_tokens, temperature)
        self.stats = SpecStats(gamma=gamma)
        self.target, self.draft = _CachedLM(target, vocab), _CachedLM(draft, vocab)
        self.tokens = input_ids.long()
        self.prompt_len = input_ids.shape[1]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.eos = _eos_ids(eos_token_id)
        self.generator = generator
        self.finished = max_new_tokens == 0

    @property
    def new_tokens(self) -> torch.LongTensor:
        return self.tokens[0, self.prompt_len :]

    def _draft_tokens(self, k: int) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Draft up to k tokens (fewer if the draft emits eos). Returns (K,) ids and (K, V) probs."""
        ids: list[int] = []
        probs: list[torch.Tensor] = []
        pending = self.tokens[:, len(self.draft) :]  # tokens the draft cache has not seen
        for _ in range(k):
            logits = self.draft.feed(pending, keep=1)[0]  # (V,)
            token = _pick(logits, self.temperature, self.generator)
            if self.temperature > 0:
                probs.append(_probs(logits, self.temperature))
            ids.append(token)
            if token in self.eos:
                break
            pending = torch.tensor([[token]], device=self.tokens.device)
        drafted = torch.tensor(ids, dtype=torch.long, device=self.tokens.device)
        return drafted, (torch.stack(probs) if probs else None)

    @torch.no_grad()
    def step(self) -> list[int]:
        """One round: draft, verify in one target pass, roll back caches. Returns emitted tokens."""
        if self.finished:
            return []
        stats, start_len = self.stats, self.tokens.shape[1]
        remaining = self.max_new_tokens - (start_len - self.prompt_len)
        # Leave room for the correction / bonus token so no more than max_new_tokens are emitted.
        drafted, draft_probs = self._draft_tokens(min(stats.gamma, remaining - 1))
        k = len(drafted)

        block = torch.cat([self.tokens[:, len(self.target) :], drafted[None]], dim=1)
        target_logits = self.target.feed(block, keep=k + 1)  # (K+1, V)
        if self.temperature == 0:
            n_accepted, next_token = _verify_greedy(drafted, target_logits)
        else:
            n_accepted, next_token = _verify_sampled(
                drafted, draft_probs, target_logits, self.temperature, self.generator
            )

        emitted, hit_eos = _cut_after_eos(drafted[:n_accepted].tolist() + [next_token], self.eos)
        self.tokens = torch.cat(
            [self.tokens, torch.tensor([emitted], device=self.tokens.device)], 1
        )
        emitted_total = self.tokens.shape[1] - self.prompt_len
        self.finished = hit_eos or emitted_total >= self.max_new_tokens

        # Both caches keep only the committed prefix: prompt + previous output + accepted drafts.
        self.target.rollback(start_len + n_accepted)
        self.draft.rollback(start_len + n_accepted)
        _record_round(stats, k, n_accepted, len(emitted))
        stats.draft_seconds, stats.target_seconds = self.draft.seconds, self.target.seconds
        stats.draft_passes, stats.target_passes = self.draft.calls, self.target.calls
        return emitted


@torch.no_grad()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.LongTensor,
    *,
    gamma: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> tuple[torch.LongTensor, SpecStats]:
    """Generate up to ``max_new_tokens`` after the (1, T) prompt with speculative decoding.

    Returns the new tokens (1-D; ends at and includes the first eos) and the run's ``SpecStats``.
    All randomness comes from ``generator`` (or the global RNG when it is None).
    """
    decoder = SpeculativeDecoder(
        target,
        draft,
        input_ids,
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        generator=generator,
        vocab=vocab,
    )
    while not decoder.finished:
        decoder.step()
    return decoder.new_tokens, decoder.stats


@torch.no_grad()
def autoregressive_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> torch.LongTensor:
    """Target-only, KV-cached decoding with the conventions of ``speculative_generate``."""
    _check_args(input_ids, max_new_tokens, temperature)
    eos = _eos_ids(eos_token_id)
    lm = _CachedLM(model, vocab)
    emitted: list[int] = []
    pending = input_ids.long()
    while len(emitted) < max_new_tokens:
        token = _pick(lm.feed(pending, keep=1)[0], temperature, generator)
        emitted.append(token)
        if token in eos:
            break
        pending = torch.tensor([[token]], device=input_ids.device)
    return torch.tensor(emitted, dtype=torch.long, device=input_ids.device)


# ---------------------------------------------------------------------------------------------
# Batches: per-row acceptance over shared caches with holes


class _MaskedCachedLM:
    """A model with one batched KV cache whose committed slots are marked by ``slot_mask`` (B, S).

    Rows accept different numbers of drafts, so a rejected slot of one row may sit below a kept
    slot of another. It stays in the cache as a hole: masked out of attention and skipped by the
    position ids (a row's position = its count of committed slots). Columns no row uses are cropped.
    """

    def __init__(
        self, model: torch.nn.Module, batch_size: int, device: torch.device, vocab: int | None
    ):
        self.model = model
        self.vocab = vocab  # logits kept per position: the tokenizer's ids (None: all)
        self.cache: Any = _recording_cache(model)
        self.slot_mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (B, S)
        self._logits_to_keep = _accepts_logits_to_keep(model)
        self._cache_argument = _cache_argument(model)

    def cached(self, row: int) -> int:
        """Committed tokens of ``row`` held by the cache (a prefix of the row's tokens)."""
        return int(self.slot_mask[row].sum())

    def feed(self, rows: list[list[int]], keep: int) -> tuple[torch.Tensor, float]:
        """Append rows[b] to row b (rows may be empty). Returns ((B, keep, V) logits, seconds).

        The block is left-padded, so the last ``keep`` logits of a row are those of its last tokens.
        """
        batch, width = len(rows), max(len(r) for r in rows)
        device = self.slot_mask.device
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, L)
        new_mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, L)
        for b, row in enumerate(rows):
            if row:
                ids[b, width - len(row) :] = torch.tensor(row, device=device)
                new_mask[b, width - len(row) :] = 1
        counts = self.slot_mask.sum(dim=1, keepdim=True)  # (B, 1)
        position_ids = (counts + new_mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, L)
        attention_mask = torch.cat([self.slot_mask, new_mask], dim=1)  # (B, S + L)
        kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
        kwargs[self._cache_argument] = self.cache
        start = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        logits = out.logits[:, -keep:, : self.vocab].float()  # (B, keep, V)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        seconds = time.perf_counter() - start
        self.cache, self.slot_mask = _returned_cache(self.model, out), attention_mask
        _record_past(self.cache)
        return logits, seconds

    def drop_last(self, row: int, n: int) -> None:
        """Uncommit the last n committed slots of ``row``."""
        if n > 0:
            slots = self.slot_mask[row].nonzero().flatten()[-n:]
            self.slot_mask[row, slots] = 0

    def crop_unused(self) -> None:
        used = self.slot_mask.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 0
        _crop_cache(self.cache, length)
        self.slot_mask = self.slot_mask[:, :length]


def left_padded(
    rows: list[list[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch, as generation needs: ids (B, T) and mask (B, T);
    `_left_padded_rows` is its inverse."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _left_padded_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> list[list[int]]:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (B, T) with T >= 1, got {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        n_pad = len(mask) - sum(mask)
        if n_pad == len(mask) or any(mask[:n_pad]) or not all(mask[n_pad:]):
            raise ValueError(
                "attention_mask must be left padding (zeros, then ones) with at least one token "
                "per row; tokenize with padding_side='left'."
            )
        rows.append(ids[n_pad:])
    return rows


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of ``model``'s sliding-window layers, or None when it has none."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _holes_may_cross_window(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    rows: list[list[int]],
    gamma: int,
    max_new_tokens: int,
) -> bool:
    """True when a batch's cache may outgrow a sliding window (of either model) while it holds holes.

    transformers' sliding-window layers count cache slots, not a row's tokens: a hole (another
    row's padding, a rejected draft kept for another row) inside the window hides one of the row's
    own tokens, and the layer keeps only the last window's slots. Below the window every slot is
    seen and the mask is exact. A round adds at most gamma + 1 slots to either cache (the target
    takes its uncached token and the drafts; the draft at most two uncached tokens, then one per
    draft), and every round commits at least one token to each active row.
    """
    windows = [w for w in (_sliding_window(target), _sliding_window(draft)) if w is not None]
    if not windows:
        return False
    most_slots = max(len(row) for row in rows) + max_new_tokens * (gamma + 1)
    return most_slots >= min(windows)


@torch.no_grad()
def speculative_generate_batch(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gamma: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> tuple[list[torch.LongTensor], list[SpecStats]]:
    """Speculative decoding of a left-padded (B, T) batch, each row accepting its own drafts.

    Returns per row the new tokens (1-D, lengths differ when rows stop at eos) and ``SpecStats``.
    A row's counts are those ``speculative_generate`` gives for it alone: its ``target_calls``
    counts the batched passes it took part in. A pass's seconds (and the pass itself, in
    ``*_passes``) are split evenly over its rows, so merging the rows' stats gives the batch's
    forward-pass time and count. Rows run in lockstep: a round drafts while any row still drafts,
    and a row that has finished or stopped drafting feeds nothing.
    Hugging Face models only: they take ``attention_mask`` and ``position_ids``. When a model
    has sliding-window layers and the batch's cache may outgrow the window, the rows are decoded
    one at a time (see _holes_may_cross_window): same tokens, no batching gain.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = _left_padded_rows(input_ids, attention_mask)
    batch, device = len(tokens), input_ids.device
    if batch > 1 and _holes_may_cross_window(target, draft, tokens, gamma, max_new_tokens):
        options = dict(temperature=temperature, eos_token_id=eos_token_id, generator=generator)
        rows_alone = [
            speculative_generate(
                target,
                draft,
                torch.tensor([row], dtype=torch.long, device=device),
                gamma=gamma,
                max_new_tokens=max_new_tokens,
                vocab=vocab,
                **options,
            )
            for row in tokens
        ]
        return [out for out, _ in rows_alone], [stats for _, stats in rows_alone]
    prompt_lens = [len(row) for row in tokens]
    stats = [SpecStats(gamma=gamma) for _ in range(batch)]
    eos = _eos_ids(eos_token_id)
    active = [max_new_tokens > 0] * batch
    tgt = _MaskedCachedLM(target, batch, device, vocab)
    dft = _MaskedCachedLM(draft, batch, device, vocab)

    def charge(rows: list[int], seconds: float, model: str) -> None:
        for b in rows:
            row = stats[b]
            setattr(row, f"{model}_seconds", getattr(row, f"{model}_seconds") + seconds / len(rows))
            setattr(row, f"{model}_passes", getattr(row, f"{model}_passes") + 1 / len(rows))

    while any(active):
        rows = [b for b in range(batch) if active[b]]
        budget = {
            b: min(gamma, max_new_tokens - (len(tokens[b]) - prompt_lens[b]) - 1) for b in rows
        }
        drafted: dict[int, list[int]] = {b: [] for b in rows}
        draft_probs: dict[int, list[torch.Tensor]] = {b: [] for b in rows}
        drafting = [b for b in rows if budget[b] > 0]
        first = True
        while drafting:
            feed = [[] for _ in range(batch)]
            for b in drafting:
                feed[b] = tokens[b][dft.cached(b) :] if first else drafted[b][-1:]
            logits, seconds = dft.feed(feed, keep=1)  # (B, 1, V)
            charge(drafting, seconds, "draft")
            for b in drafting:
                token = _pick(logits[b, 0], temperature, generator)
                drafted[b].append(token)
                if temperature > 0:
                    draft_probs[b].append(_probs(logits[b, 0], temperature))
            drafting = [
                b for b in drafting if len(drafted[b]) < budget[b] and drafted[b][-1] not in eos
            ]
            first = False

        feed = [[] for _ in range(batch)]
        for b in rows:
            feed[b] = tokens[b][tgt.cached(b) :] + drafted[b]
        keep = 1 + max(len(drafted[b]) for b in rows)
        logits, seconds = tgt.feed(feed, keep=keep)  # (B, keep, V)
        charge(rows, seconds, "target")
        for b in rows:
            k = len(drafted[b])
            row_drafts = torch.tensor(drafted[b], dtype=torch.long, device=device)
            row_logits = logits[b, keep - k - 1 :]  # (k+1, V)
            if temperature == 0:
                n_accepted, next_token = _verify_greedy(row_drafts, row_logits)
            else:
                probs = torch.stack(draft_probs[b]) if k else None
                n_accepted, next_token = _verify_sampled(
                    row_drafts, probs, row_logits, temperature, generator
                )
            emitted, hit_eos = _cut_after_eos(drafted[b][:n_accepted] + [next_token], eos)
            tokens[b] += emitted
            active[b] = not hit_eos and len(tokens[b]) - prompt_lens[b] < max_new_tokens
            # The target cached the row's k drafts, the draft all but the last one.
            tgt.drop_last(b, k - n_accepted)
            dft.drop_last(b, max(k - 1 - n_accepted, 0))
            _record_round(stats[b], k, n_accepted, len(emitted))
        tgt.crop_unused()
        dft.crop_unused()

    outputs = [
        torch.tensor(row[n:], dtype=torch.long, device=device)
        for row, n in zip(tokens, prompt_lens, strict=True)
    ]
    return outputs, stats


@torch.no_grad()
def autoregressive_generate_batch(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> list[torch.LongTensor]:
    """Target-only, KV-cached decoding of a left-padded (B, T) batch: the batched baseline of
    ``speculative_generate_batch`` (same cache and masking). Returns the new tokens of each row;
    at temperature 0 each row's are those ``autoregressive_generate`` gives for it alone."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    feed = _left_padded_rows(input_ids, attention_mask)
    batch, device = len(feed), input_ids.device
    eos = _eos_ids(eos_token_id)
    lm = _MaskedCachedLM(model, batch, device, vocab)
    emitted: list[list[int]] = [[] for _ in range(batch)]
    active = [max_new_tokens > 0] * batch
    while any(active):
        logits, _ = lm.feed([feed[b] if active[b] else [] for b in range(batch)], keep=1)
        for b in range(batch):
            if not active[b]:
                continue
            token = _pick(logits[b, 0], temperature, generator)
            emitted[b].append(token)
            active[b] = token not in eos and len(emitted[b]) < max_new_tokens
            feed[b] = [token]
    return [torch.tensor(row, dtype=torch.long, device=device) for row in emitted]
