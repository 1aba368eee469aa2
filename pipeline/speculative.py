"""Speculative decoding: a draft model proposes up to γ tokens, the target verifies them in one pass.

Both models keep a KV cache (transformers ``DynamicCache`` or anything with ``get_seq_length`` and
``crop``); on rejection the caches are rolled back with ``cache.crop(-n)``, so neither model is ever
re-fed the prefix. Any HF causal LM works: models are called as
``model(input_ids=..., past_key_values=cache, use_cache=True)`` and must return ``.logits`` and
``.past_key_values``.

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

Near the end a round drafts ``min(γ, max_new_tokens - emitted - 1)`` tokens, so no more than
``max_new_tokens`` are produced (the same rule as transformers' assisted generation). The draft
stops drafting at eos, and output stops right after the first eos.
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
    "speculative_generate",
]


@dataclass
class SpecStats:
    """Counters of a speculative run; see the module docstring for the definitions."""

    gamma: int
    drafted: int = 0  # draft tokens proposed (sum over rounds of tokens actually drafted)
    accepted: int = 0  # draft tokens accepted by the target
    target_calls: int = 0  # target forward passes (each one verifies and emits >= 1 token)
    new_tokens: int = 0  # tokens emitted: accepted + corrections + bonus tokens
    accepted_at: list[int] = field(default_factory=list)  # (γ,) rounds where position i was accepted
    drafted_at: list[int] = field(default_factory=list)  # (γ,) rounds where position i was verified
    draft_seconds: float = 0.0
    target_seconds: float = 0.0

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
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at)]
        self.drafted_at = [a + b for a, b in zip(self.drafted_at, other.drafted_at)]
        self.draft_seconds += other.draft_seconds
        self.target_seconds += other.target_seconds

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
        """Acceptance rate of drafted position i+1 given positions 1..i were accepted (NaN: never reached)."""
        return [a / d if d else math.nan for a, d in zip(self.accepted_at, self.drafted_at)]

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


def _cache_len(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def _crop_cache(cache: Any, length: int) -> None:
    """Roll ``cache`` back to its first ``length`` positions."""
    extra = _cache_len(cache) - length
    if extra > 0:
        # A negative argument removes that many positions, in transformers 4.x and 5.x alike.
        cache.crop(-extra)


class _CachedLM:
    """One model plus its KV cache; ``feed`` appends tokens and returns the last ``keep`` logits."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: Any = None
        self.seconds = 0.0
        self._logits_to_keep = _accepts_logits_to_keep(model)

    def __len__(self) -> int:
        return _cache_len(self.cache)

    def feed(self, input_ids: torch.LongTensor, keep: int) -> torch.Tensor:
        # input_ids: (1, L) -> logits (keep, V) for the last `keep` fed positions
        kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
        start = time.perf_counter()
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **kwargs)
        logits = out.logits[0, -keep:].float()
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - start
        if out.past_key_values is None:
            raise TypeError(
                f"{type(self.model).__name__} returned past_key_values=None with use_cache=True; "
                "speculative decoding needs a KV cache that supports get_seq_length() and crop()."
            )
        self.cache = out.past_key_values
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
    ):
        _check_args(input_ids, max_new_tokens, temperature)
        self.stats = SpecStats(gamma=gamma)
        self.target, self.draft = _CachedLM(target), _CachedLM(draft)
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

        emitted = drafted[:n_accepted].tolist() + [next_token]
        for i, token in enumerate(emitted):
            if token in self.eos:
                emitted = emitted[: i + 1]
                self.finished = True
                break
        self.tokens = torch.cat([self.tokens, torch.tensor([emitted], device=self.tokens.device)], 1)
        if self.tokens.shape[1] - self.prompt_len >= self.max_new_tokens:
            self.finished = True

        # Both caches keep only the committed prefix: prompt + previous output + accepted drafts.
        self.target.rollback(start_len + n_accepted)
        self.draft.rollback(start_len + n_accepted)

        stats.target_calls += 1
        stats.drafted += k
        stats.accepted += n_accepted
        stats.new_tokens += len(emitted)
        for i in range(min(n_accepted + 1, k)):  # positions the verifier reached
            stats.drafted_at[i] += 1
        for i in range(n_accepted):
            stats.accepted_at[i] += 1
        stats.draft_seconds, stats.target_seconds = self.draft.seconds, self.target.seconds
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
) -> torch.LongTensor:
    """Target-only, KV-cached decoding with the conventions of ``speculative_generate``."""
    _check_args(input_ids, max_new_tokens, temperature)
    eos = _eos_ids(eos_token_id)
    lm = _CachedLM(model)
    emitted: list[int] = []
    pending = input_ids.long()
    while len(emitted) < max_new_tokens:
        token = _pick(lm.feed(pending, keep=1)[0], temperature, generator)
        emitted.append(token)
        if token in eos:
            break
        pending = torch.tensor([[token]], device=input_ids.device)
    return torch.tensor(emitted, dtype=torch.long, device=input_ids.device)
