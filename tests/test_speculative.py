"""Speculative decoding: stub models with hand-written logits, then tiny random Llamas vs transformers."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specdraft.kernels import greedy_drafting_acceptance, token_acceptance
from specdraft.pipeline.batches import Collator
from specdraft.pipeline.config import EvaluateConfig
from specdraft.pipeline.decoding import (
    SpecStats,
    SpeculativeDecoder,
    autoregressive_generate,
    autoregressive_generate_batch,
    speculative_generate,
    speculative_generate_batch,
)
from specdraft.pipeline.evaluation import (
    DraftRuns,
    PromptSet,
    acceptance_length,
    analytic_acceptance,
    continuation_sequences,
    draft_metrics,
    evaluate_draft,
    expected_rounds,
    judge_draft,
    position_acceptance,
    prompt_sets,
    spec_prompt_rows,
    task_indices,
)
from specdraft.pipeline.spec_runs import (
    LosslessError,
    spec_decoding,
    target_only_greedy,
    tau_predicted,
)

# transformers 5.24 renamed the KV cache argument to `cache`; `past_key_values` warns and goes in 5.40.
pytestmark = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")

V = 64  # vocab of the stub and Llama models (the statistical tests use their own tiny vocab)
PAD = V - 1  # never in a prompt: transformers masks prompt tokens equal to pad_token_id


# ---------------------------------------------------------------------------------------------
# Stub models


class StubLM(torch.nn.Module):
    """HF-style causal LM whose next-token logits are ``logits_fn(prefix)``.

    The KV cache is a real DynamicCache holding the token ids themselves as fake keys, so the
    prefix a stub sees is exactly what its cache holds: a wrong rollback changes its logits.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.logits_fn = logits_fn
        self.call_starts: list[int] = []  # cache length at each call

    def forward(self, input_ids, cache=None, use_cache=False, attention_mask=None, **kw):
        cache = cache if cache is not None else DynamicCache()
        start = cache.get_seq_length()
        self.call_starts.append(start)
        fake_kv = input_ids.float()[:, None, :, None]  # (B, 1, L, 1)
        keys, _ = cache.update(fake_kv, fake_kv, 0)
        history = keys[:, 0, :, 0].long()  # (B, S): S = start + L cache slots
        logits = []
        for b, row in enumerate(history):
            if attention_mask is None:
                prefixes = [row[: s + 1] for s in range(start, len(row))]
            else:  # a slot's prefix: the row's unmasked slots up to it (holes, padding skipped)
                mask = attention_mask[b].bool()
                prefixes = [row[: s + 1][mask[: s + 1]] for s in range(start, len(row))]
            logits.append(torch.stack([self.logits_fn(p if len(p) else row[:1]) for p in prefixes]))
        logits = torch.stack(logits)  # (B, L, V)
        return SimpleNamespace(logits=logits, cache=cache if use_cache else None)


def one_hot_logits(token: int, vocab: int = V) -> torch.Tensor:
    logits = torch.zeros(vocab)
    logits[token] = 10.0
    return logits


def count_up(prefix: torch.Tensor) -> torch.Tensor:
    """Target: the next token is the last one plus 1."""
    return one_hot_logits((int(prefix[-1]) + 1) % V)


def count_up_by_two(prefix: torch.Tensor) -> torch.Tensor:
    """A draft that never agrees with count_up."""
    return one_hot_logits((int(prefix[-1]) + 2) % V)


PROMPT = torch.tensor([[5, 9, 3]])


def stats_of(target_fn, draft_fn, gamma, max_new_tokens, **kwargs):
    target, draft = StubLM(target_fn), StubLM(draft_fn)
    out, stats = speculative_generate(
        target, draft, PROMPT, gamma=gamma, max_new_tokens=max_new_tokens, **kwargs
    )
    return out, stats, target, draft


# ---------------------------------------------------------------------------------------------
# Stub tests: acceptance patterns, lengths, eos, stats


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_never_accept_gives_one_token_per_target_call(gamma):
    out, stats, target, _ = stats_of(count_up, count_up_by_two, gamma, 13)
    assert out.tolist() == [(3 + i) % V for i in range(1, 14)]
    assert stats.spec_alpha == 0 and stats.accepted == 0
    assert stats.tau == 1 and stats.target_calls == 13 == stats.new_tokens
    assert stats.per_position[0] == 0 and all(math.isnan(x) for x in stats.per_position[1:])
    assert target.call_starts.count(0) == 1  # the target never re-reads the prompt


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_always_accept_gives_gamma_plus_one_tokens_per_target_call(gamma):
    rounds = 3
    n = rounds * (gamma + 1)
    out, stats, target, draft = stats_of(count_up, count_up, gamma, n)
    assert out.tolist() == [(3 + i) % V for i in range(1, n + 1)]
    assert stats.spec_alpha == 1 and stats.tau == gamma + 1
    assert stats.target_calls == rounds and stats.drafted == rounds * gamma
    assert stats.per_position == [1.0] * gamma
    assert stats.accepted_at == stats.drafted_at == [rounds] * gamma
    # KV-cached drafting: one draft call per drafted token, and no model re-reads the prompt.
    assert len(draft.call_starts) == rounds * gamma
    assert draft.call_starts.count(0) == 1 and target.call_starts.count(0) == 1


def test_accept_two_then_reject_pattern():
    """The draft agrees with the target on the first two drafted tokens of each round only."""
    prompt_len, gamma, rounds = PROMPT.shape[1], 5, 4

    def agrees_twice(prefix: torch.Tensor) -> torch.Tensor:
        # Each round emits 3 tokens (2 accepted + 1 correction), so drafted position 3 of a round
        # predicts new-token index 2 mod 3.
        if (len(prefix) - prompt_len) % 3 == 2:
            return count_up_by_two(prefix)
        return count_up(prefix)

    out, stats, _, _ = stats_of(count_up, agrees_twice, gamma, 3 * rounds)
    assert out.tolist() == [(3 + i) % V for i in range(1, 3 * rounds + 1)]
    assert stats.tau == 3 and stats.target_calls == rounds
    # The last round has room for only 2 drafts (3 tokens left): both accepted, then the bonus.
    assert stats.drafted == gamma * (rounds - 1) + 2
    assert stats.accepted == 2 * rounds
    assert stats.accepted_at == [rounds, rounds, 0, 0, 0]
    assert stats.drafted_at == [rounds, rounds, rounds - 1, 0, 0]
    p = stats.per_position
    assert p[:3] == [1.0, 1.0, 0.0] and math.isnan(p[3]) and math.isnan(p[4])
    assert stats.spec_alpha == pytest.approx(8 / 17)
    assert stats.alpha_verified == pytest.approx(8 / 11)  # accepted / (accepted + rejections)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 4, 7, 11])
@pytest.mark.parametrize("draft_fn", [count_up, count_up_by_two], ids=["always", "never"])
def test_length_is_exactly_max_new_tokens(max_new_tokens, draft_fn):
    gamma = 4
    out, stats, _, _ = stats_of(count_up, draft_fn, gamma, max_new_tokens)
    assert out.tolist() == [(3 + i) % V for i in range(1, max_new_tokens + 1)]
    assert stats.new_tokens == max_new_tokens
    if draft_fn is count_up:
        assert stats.target_calls == math.ceil(max_new_tokens / (gamma + 1))


@pytest.mark.parametrize("eos_at", [1, 2, 5, 6, 9])  # 1-based index of eos in the output
@pytest.mark.parametrize("draft_fn", [count_up, count_up_by_two], ids=["always", "never"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_stops_right_after_eos(eos_at, draft_fn, gamma):
    eos = (3 + eos_at) % V
    out, stats, _, _ = stats_of(count_up, draft_fn, gamma, 20, eos_token_id=[60, eos])
    expected = [(3 + i) % V for i in range(1, eos_at + 1)]
    assert out.tolist() == expected
    assert (
        out.tolist()
        == autoregressive_generate(
            StubLM(count_up), PROMPT, max_new_tokens=20, eos_token_id=eos
        ).tolist()
    )
    assert stats.new_tokens == eos_at
    if draft_fn is count_up:  # the draft stops drafting at eos: nothing drafted is wasted
        assert stats.accepted == stats.drafted


def test_stats_merge_and_to_dict():
    _, a, _, _ = stats_of(count_up, count_up, 2, 6)
    _, b, _, _ = stats_of(count_up, count_up_by_two, 2, 4)
    merged = SpecStats(gamma=2)
    merged.merge(a)
    merged.merge(b)
    assert (merged.drafted, merged.accepted) == (a.drafted + b.drafted, a.accepted + b.accepted)
    assert merged.new_tokens == 10 and merged.target_calls == a.target_calls + b.target_calls
    assert merged.tau == pytest.approx(10 / (2 + 4))
    assert merged.accepted_at == [2, 2] and merged.drafted_at == [2 + 3, 2]
    d = json.loads(json.dumps(b.to_dict(), allow_nan=False))
    assert d["per_position"] == [0.0, None] and d["tau"] == 1.0 and d["spec_alpha"] == 0.0
    with pytest.raises(ValueError, match="gamma"):
        merged.merge(SpecStats(gamma=3))


def test_bad_arguments_raise():
    target, draft = StubLM(count_up), StubLM(count_up)
    with pytest.raises(ValueError, match="shape"):
        speculative_generate(target, draft, PROMPT.repeat(2, 1), gamma=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, draft, PROMPT, gamma=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, PROMPT, gamma=2, max_new_tokens=3, temperature=-1)


def test_model_without_cache_is_rejected():
    class NoCache(StubLM):
        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(logits=super().forward(input_ids).logits, cache=None)

    with pytest.raises(TypeError, match="KV cache"):
        speculative_generate(NoCache(count_up), StubLM(count_up), PROMPT, gamma=2, max_new_tokens=3)


def test_a_model_with_the_old_cache_argument_still_decodes():
    """Models whose forward predates transformers' `cache` (remote code, older releases) get
    `past_key_values=` and return it under that name."""

    class OldNames(StubLM):
        def forward(self, input_ids, past_key_values=None, use_cache=False, **kw):
            out = super().forward(input_ids, cache=past_key_values, use_cache=use_cache, **kw)
            return SimpleNamespace(logits=out.logits, past_key_values=out.cache)

    target = OldNames(count_up)
    out, stats = speculative_generate(target, StubLM(count_up), PROMPT, gamma=3, max_new_tokens=8)
    assert out.tolist() == [(3 + i) % V for i in range(1, 9)]
    assert stats.spec_alpha == 1 and target.call_starts.count(0) == 1  # its cache was reused


# ---------------------------------------------------------------------------------------------
# Rejection sampling: the output distribution is the target's


SMALL_V = 5
N_SAMPLES = 2000  # per chi-square test; the smallest expected cell count is ~6


def _row_stochastic(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(torch.randn(SMALL_V, SMALL_V, generator=g), dim=-1) + 0.04
    return table / table.sum(-1, keepdim=True)  # (V, V): row = previous token


TARGET_TABLE, DRAFT_TABLE = _row_stochastic(1), _row_stochastic(2)


def table_lm(table: torch.Tensor) -> StubLM:
    return StubLM(lambda prefix: table[int(prefix[-1])].log())


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p = upper regularized gamma Q(df/2, stat/2)."""
    n = observed.sum()
    expected = n * expected_probs
    stat = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat.double() / 2))


def first_two_tokens_distribution(table: torch.Tensor, temperature: float, prev: int):
    p = torch.softmax(table.log() / temperature, dim=-1)  # (V, V)
    return p[prev][:, None] * p  # (V, V): P(x1, x2)


def empirical_pairs(sample: Callable[[], torch.Tensor], n: int) -> torch.Tensor:
    counts = Counter(tuple(sample()[:2].tolist()) for _ in range(n))
    observed = torch.zeros(SMALL_V, SMALL_V, dtype=torch.float64)
    for (x1, x2), c in counts.items():
        observed[x1, x2] = c
    return observed


@pytest.mark.parametrize(
    "gamma,max_new_tokens,temperature",
    [(1, 2, 1.0), (2, 3, 2.0), (1, 2, 0.7)],
)
def test_sampling_matches_target_distribution(gamma, max_new_tokens, temperature):
    """Joint law of the first two tokens (both drafted in one round when gamma >= 2)."""
    prompt = torch.tensor([[0]])
    target, draft = table_lm(TARGET_TABLE), table_lm(DRAFT_TABLE)
    g = torch.Generator().manual_seed(1234)
    observed = empirical_pairs(
        lambda: speculative_generate(
            target,
            draft,
            prompt,
            gamma=gamma,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=g,
        )[0],
        n=N_SAMPLES,
    )
    expected = first_two_tokens_distribution(TARGET_TABLE, temperature, prev=0)
    assert chi_square_p_value(observed.flatten(), expected.flatten()) > 1e-3
    # The first token alone (one verification step).
    assert chi_square_p_value(observed.sum(1), expected.sum(1)) > 1e-3


def test_sampling_test_detects_the_draft_distribution():
    """Negative control: the same chi-square test rejects samples from the draft."""
    g = torch.Generator().manual_seed(1234)
    draft = table_lm(DRAFT_TABLE)
    observed = empirical_pairs(
        lambda: autoregressive_generate(
            draft, torch.tensor([[0]]), max_new_tokens=2, temperature=1.0, generator=g
        ),
        n=N_SAMPLES,
    )
    expected = first_two_tokens_distribution(TARGET_TABLE, 1.0, prev=0)
    assert chi_square_p_value(observed.flatten(), expected.flatten()) < 1e-6


def test_one_token_at_temperature_is_a_target_sample():
    """max_new_tokens=1 leaves no room to draft: the token is sampled from the target alone."""
    target, draft = table_lm(TARGET_TABLE), table_lm(DRAFT_TABLE)
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(SMALL_V, dtype=torch.float64)
    for _ in range(1000):
        out, stats = speculative_generate(
            target,
            draft,
            torch.tensor([[4]]),
            gamma=3,
            max_new_tokens=1,
            temperature=1.0,
            generator=g,
        )
        counts[out[0]] += 1
    assert stats.drafted == 0 and stats.target_calls == 1
    assert chi_square_p_value(counts, TARGET_TABLE[4]) > 1e-3


def test_same_generator_seed_same_output():
    target, draft = table_lm(TARGET_TABLE), table_lm(DRAFT_TABLE)
    runs = [
        speculative_generate(
            target,
            draft,
            torch.tensor([[1]]),
            gamma=3,
            max_new_tokens=30,
            temperature=1.0,
            generator=torch.Generator().manual_seed(99),
        )[0].tolist()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------
# Tiny random Llamas


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # peakier logits than the default 0.02
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llamas():
    target = tiny_llama(0)
    # A perturbed copy agrees with the target often but not always (greedy alpha ~0.5-0.9).
    near = tiny_llama(1)
    near.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    far = tiny_llama(2, layers=1, hidden=16)  # unrelated: almost never agrees
    return target, {"near": near, "far": far}


def prompt_of(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, PAD, (1, length), generator=torch.Generator().manual_seed(seed))


def hf_new_tokens(model, ids, **kwargs) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("draft_name", ["near", "far"])
@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("max_new_tokens", [1, 8, 21])
def test_greedy_equals_autoregressive_and_hf(llamas, draft_name, gamma, max_new_tokens):
    target, drafts = llamas
    ids = prompt_of(7, seed=gamma)
    spec, stats = speculative_generate(
        target, drafts[draft_name], ids, gamma=gamma, max_new_tokens=max_new_tokens
    )
    ar = autoregressive_generate(target, ids, max_new_tokens=max_new_tokens)
    assert spec.tolist() == ar.tolist()
    assert spec.tolist() == hf_new_tokens(target, ids, max_new_tokens=max_new_tokens)
    assert stats.new_tokens == max_new_tokens


def test_decoding_a_transformers_model_uses_the_current_cache_api(llamas):
    """No deprecation of `past_key_values`: neither the FutureWarning of the forward argument (an
    error in this module) nor the once-per-process log line of reading `output.past_key_values`."""
    import logging

    from transformers.utils import logging as hf_logging

    target, drafts = llamas
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    hf_logging.get_logger().warning_once.cache_clear()  # a line logged earlier is not repeated
    try:
        speculative_generate(target, drafts["near"], prompt_of(7), gamma=3, max_new_tokens=6)
        ids, mask = torch.tensor([[PAD, 4, 5], [1, 2, 3]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
        speculative_generate_batch(target, drafts["near"], ids, mask, gamma=3, max_new_tokens=6)
        # the same log line, when the old name is read, shows the capture works
        assert target(input_ids=prompt_of(3), use_cache=True).past_key_values is not None
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert [line for line in lines if "past_key_values" in line] == [lines[-1]]


def test_greedy_partial_acceptance_really_happens(llamas):
    """The near draft must exercise accept, reject and rollback, or the tests above prove little."""
    target, drafts = llamas
    _, stats = speculative_generate(
        target, drafts["near"], prompt_of(7), gamma=4, max_new_tokens=40
    )
    assert 0.2 < stats.spec_alpha < 1
    assert 0 < min(stats.accepted_at) and stats.accepted_at[0] < stats.drafted_at[0]


def test_greedy_eos_matches_hf(llamas):
    target, drafts = llamas
    ids = prompt_of(5, seed=3)
    plain = autoregressive_generate(target, ids, max_new_tokens=30).tolist()
    eos = plain[6]  # stop at the first occurrence of the 7th token
    stop = plain.index(eos) + 1
    for gamma in (2, 4):
        spec, stats = speculative_generate(
            target, drafts["near"], ids, gamma=gamma, max_new_tokens=30, eos_token_id=eos
        )
        assert (
            spec.tolist()
            == plain[:stop]
            == hf_new_tokens(target, ids, max_new_tokens=30, eos_token_id=eos)
        )
        assert stats.new_tokens == stop


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_matches_transformers_assisted_generation(llamas, gamma):
    """Same tokens as HF assisted generation, and the same number of target and draft passes."""
    target, drafts = llamas
    draft = drafts["near"]
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0  # falsy: never stop drafting early
    ids, n = prompt_of(6, seed=10 + gamma), 23

    calls = Counter()
    hooks = [m.register_forward_hook(lambda m, *_: calls.update([m])) for m in (target, draft)]
    try:
        hf = hf_new_tokens(target, ids, assistant_model=draft, max_new_tokens=n)
        hf_calls = dict(calls)
        calls.clear()
        spec, stats = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=n)
    finally:
        for h in hooks:
            h.remove()
    assert spec.tolist() == hf
    assert hf_calls[target] == stats.target_calls == calls[target] == stats.target_passes
    assert hf_calls[draft] == calls[draft] == stats.draft_passes
    assert stats.cost_ratio > 0


def test_draft_equal_to_target_accepts_everything_at_temperature_one(llamas):
    target, _ = llamas
    g = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(
        target, target, prompt_of(4), gamma=3, max_new_tokens=24, temperature=1.0, generator=g
    )
    assert len(out) == 24
    assert stats.spec_alpha == 1 and stats.tau == 4


def _assert_cache_is_fresh_prefill(model, cache, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        fresh = model(input_ids=tokens, use_cache=True).cache
    assert cache.get_seq_length() == tokens.shape[1]
    for got, want in zip(cache.layers, fresh.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollback_leaves_caches_equal_to_fresh_prefill(llamas, temperature):
    target, drafts = llamas
    decoder = SpeculativeDecoder(
        target,
        drafts["near"],
        prompt_of(6, seed=5),
        gamma=4,
        max_new_tokens=40,
        temperature=temperature,
        generator=torch.Generator().manual_seed(3),
    )
    rejections_after_drafts = 0
    while not decoder.finished:
        before = (decoder.stats.drafted, decoder.stats.accepted)
        decoder.step()
        drafted = decoder.stats.drafted - before[0]
        accepted = decoder.stats.accepted - before[1]
        rejections_after_drafts += int(drafted >= 2 and accepted < drafted)
        tokens = decoder.tokens
        # The target holds everything but the last emitted token. After a round that drafted, the
        # draft lags by one or two (a fully accepted round leaves it the last draft and the bonus).
        assert len(decoder.target) == tokens.shape[1] - 1
        assert len(decoder.draft) <= tokens.shape[1] - 1
        if drafted and accepted < drafted:  # rolled back to exactly the accepted prefix
            assert len(decoder.draft) == tokens.shape[1] - 1
        elif drafted:
            assert len(decoder.draft) == tokens.shape[1] - 2
        _assert_cache_is_fresh_prefill(target, decoder.target.cache, tokens[:, :-1])
        _assert_cache_is_fresh_prefill(
            drafts["near"], decoder.draft.cache, tokens[:, : len(decoder.draft)]
        )
    assert rejections_after_drafts >= 2


# ---------------------------------------------------------------------------------------------
# Batches with left padding and per-row acceptance


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def counts_of(stats: SpecStats) -> dict:
    d = stats.to_dict()
    # Cost accounting depends on the batch (a batched pass is shared by its rows), counts do not.
    for key in ("draft_seconds", "target_seconds", "draft_passes", "target_passes", "cost_ratio"):
        del d[key]
    return d


def _sliding_batch():
    """A tiny Gemma-3 pair (window 4) and four rows of different lengths, left-padded."""
    from tiny_gemma import tiny_gemma3

    target, draft = tiny_gemma3(40), tiny_gemma3(40, layers=1, seed=1)
    rows = [[2, 5, 6], [2, 7, 8, 9, 10], [2, 11], [2, 12, 13, 14]]
    ids, mask = left_pad(rows)
    return target, draft, rows, ids, mask


def test_sliding_window_batch_with_holes_equals_each_row_alone():
    """Holes (padding, another row's rejected drafts) count as slots in a sliding window: a batch
    whose cache can outgrow the window decodes its rows alone, so every row is the target's text."""
    target, draft, rows, ids, mask = _sliding_batch()
    outs, stats = speculative_generate_batch(target, draft, ids, mask, gamma=3, max_new_tokens=16)
    for row, out in zip(rows, outs, strict=True):
        alone = autoregressive_generate(target, torch.tensor([row]), max_new_tokens=16)
        assert out.tolist() == alone.tolist()
    assert sum(s.drafted - s.accepted for s in stats) > 0  # rejections happened


def test_sliding_window_batch_without_the_guard_loses_the_targets_text(monkeypatch):
    """The guard above is needed: decoded in one batch, the same rows leave the target's text."""
    from specdraft.pipeline import decoding

    monkeypatch.setattr(decoding, "_holes_may_cross_window", lambda *args: False)
    target, draft, rows, ids, mask = _sliding_batch()
    outs, _ = speculative_generate_batch(target, draft, ids, mask, gamma=3, max_new_tokens=16)
    alone = [
        autoregressive_generate(target, torch.tensor([row]), max_new_tokens=16).tolist()
        for row in rows
    ]
    assert [out.tolist() for out in outs] != alone


def test_holes_may_cross_window_only_for_sliding_models_near_their_window(llamas):
    from tiny_gemma import tiny_gemma3

    from specdraft.pipeline.decoding import _holes_may_cross_window

    target, drafts = llamas
    rows = [[1] * 30, [1] * 5]
    assert not _holes_may_cross_window(target, drafts["near"], rows, 4, 200)  # no sliding layer
    gemma = tiny_gemma3(40)
    assert _holes_may_cross_window(gemma, drafts["near"], [[1, 2]], 1, 1)  # 2 + 2 slots >= 4
    assert not _holes_may_cross_window(gemma, drafts["near"], [[1]], 1, 1)  # 1 + 2 < 4
    gemma.config.sliding_window = 512
    assert not _holes_may_cross_window(gemma, drafts["near"], rows, 3, 64)  # 30 + 256 < 512
    assert _holes_may_cross_window(drafts["near"], gemma, rows, 3, 128)  # the draft's window too


BATCH_PROMPTS = [prompt_of(n, seed=n)[0].tolist() for n in (3, 7, 1, 5)]


@pytest.mark.parametrize("draft_name,gamma", [("near", 1), ("near", 4), ("far", 3)])
def test_batch_greedy_equals_each_row_alone(llamas, draft_name, gamma):
    """Same tokens and the same per-row counts as batch-1 speculative decoding of each row."""
    target, drafts = llamas
    ids, mask = left_pad(BATCH_PROMPTS)
    outs, stats = speculative_generate_batch(
        target, drafts[draft_name], ids, mask, gamma=gamma, max_new_tokens=17
    )
    for prompt, out, row_stats in zip(BATCH_PROMPTS, outs, stats, strict=True):
        alone, alone_stats = speculative_generate(
            target, drafts[draft_name], torch.tensor([prompt]), gamma=gamma, max_new_tokens=17
        )
        assert out.tolist() == alone.tolist()
        assert (
            out.tolist()
            == autoregressive_generate(target, torch.tensor([prompt]), max_new_tokens=17).tolist()
        )
        assert counts_of(row_stats) == counts_of(alone_stats)
    if draft_name == "near":  # rows really accepted different numbers of drafts
        assert len({s.accepted for s in stats}) > 1


def test_batch_rows_stop_at_their_own_eos(llamas):
    target, drafts = llamas
    ids, mask = left_pad(BATCH_PROMPTS)
    plain = [
        autoregressive_generate(target, torch.tensor([p]), max_new_tokens=25).tolist()
        for p in BATCH_PROMPTS
    ]
    eos = [plain[0][4], plain[1][9]]  # rows 0 and 1 stop early, the others maybe later or never
    outs, stats = speculative_generate_batch(
        target, drafts["near"], ids, mask, gamma=3, max_new_tokens=25, eos_token_id=eos
    )
    for prompt, out, row_stats in zip(BATCH_PROMPTS, outs, stats, strict=True):
        alone, alone_stats = speculative_generate(
            target,
            drafts["near"],
            torch.tensor([prompt]),
            gamma=3,
            max_new_tokens=25,
            eos_token_id=eos,
        )
        assert out.tolist() == alone.tolist()
        assert counts_of(row_stats) == counts_of(alone_stats)
    assert len(outs[0]) <= 5 and len(outs[1]) <= 10 and outs[0][-1] in eos


def test_batch_sampling_matches_target_distribution():
    """N_SAMPLES identical rows in one batch: the joint law of the first two tokens is the target's."""
    target, draft = table_lm(TARGET_TABLE), table_lm(DRAFT_TABLE)
    ids = torch.zeros(N_SAMPLES, 1, dtype=torch.long)
    outs, stats = speculative_generate_batch(
        target,
        draft,
        ids,
        gamma=2,
        max_new_tokens=3,
        temperature=1.0,
        generator=torch.Generator().manual_seed(5),
    )
    observed = torch.zeros(SMALL_V, SMALL_V, dtype=torch.float64)
    for out in outs:
        observed[out[0], out[1]] += 1
    expected = first_two_tokens_distribution(TARGET_TABLE, 1.0, prev=0)
    assert chi_square_p_value(observed.flatten(), expected.flatten()) > 1e-3
    assert 0 < sum(s.accepted for s in stats) < sum(s.drafted for s in stats)


def test_batch_draft_equal_to_target_accepts_everything_at_temperature_one(llamas):
    target, _ = llamas
    ids, mask = left_pad(BATCH_PROMPTS)
    outs, stats = speculative_generate_batch(
        target,
        target,
        ids,
        mask,
        gamma=3,
        max_new_tokens=12,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert [len(o) for o in outs] == [12] * len(BATCH_PROMPTS)
    assert all(s.spec_alpha == 1 and s.tau == 4 for s in stats)


def test_batch_rejects_right_padding():
    ids, mask = left_pad(BATCH_PROMPTS)
    with pytest.raises(ValueError, match="left padding"):
        speculative_generate_batch(
            StubLM(count_up), StubLM(count_up), ids, mask.flip(1), gamma=2, max_new_tokens=3
        )


def test_qwen2_greedy_equals_hf_single_and_batch():
    """Another architecture through the same path: a tiny Qwen2 target and a perturbed copy."""

    def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=PAD,
        )
        return Qwen2ForCausalLM(config).eval()

    target, draft = tiny_qwen2(0), tiny_qwen2(1)
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    ids, mask = left_pad(BATCH_PROMPTS)
    outs, _ = speculative_generate_batch(target, draft, ids, mask, gamma=3, max_new_tokens=12)
    for prompt, out in zip(BATCH_PROMPTS, outs, strict=True):
        prompt = torch.tensor([prompt])
        alone, stats = speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=12)
        assert out.tolist() == alone.tolist() == hf_new_tokens(target, prompt, max_new_tokens=12)
        assert stats.accepted > 0


def test_batch_passes_are_shared_so_merged_stats_count_each_pass_once(llamas):
    target, drafts = llamas
    ids, mask = left_pad(BATCH_PROMPTS)
    calls = Counter()
    models = (target, drafts["near"])
    hooks = [m.register_forward_hook(lambda m, *_: calls.update([m])) for m in models]
    try:
        _, stats = speculative_generate_batch(
            target, drafts["near"], ids, mask, gamma=3, max_new_tokens=15
        )
    finally:
        for h in hooks:
            h.remove()
    merged = SpecStats(gamma=3)
    for row in stats:
        merged.merge(row)
    assert merged.target_passes == pytest.approx(calls[target])
    assert merged.draft_passes == pytest.approx(calls[drafts["near"]])
    assert merged.target_calls > calls[target]  # per-row calls, for tau, count each row


def test_autoregressive_batch_equals_each_row_alone(llamas):
    target, _ = llamas
    ids, mask = left_pad(BATCH_PROMPTS)
    plain = autoregressive_generate(target, torch.tensor([BATCH_PROMPTS[1]]), max_new_tokens=20)
    eos = plain[6].item()  # row 1 stops early, the others when they meet it or at 20 tokens
    outs = autoregressive_generate_batch(target, ids, mask, max_new_tokens=20, eos_token_id=eos)
    for prompt, out in zip(BATCH_PROMPTS, outs, strict=True):
        alone = autoregressive_generate(
            target, torch.tensor([prompt]), max_new_tokens=20, eos_token_id=eos
        )
        assert out.tolist() == alone.tolist()
    assert len(outs[1]) <= 7 and outs[1][-1] == eos


# ---------------------------------------------------------------------------------------------
# The evaluation library (pipeline/evaluation.py: the evaluate stage and `specdraft eval`)


def eval_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"p{i}",
            "prompt_ids": prompt_of(2 + i % 5, seed=i)[0].tolist(),
            "task": "ab"[i % 2],
        }
        for i in range(n)
    ]


class TinyTokenizer(SimpleNamespace):
    def __len__(self) -> int:  # the evaluation compares logits over the tokenizer's ids
        return V


def run_evaluate(target, draft, rows, cfg: EvaluateConfig) -> dict:
    refs, seconds = target_only_greedy(
        target,
        [r["prompt_ids"] for r in rows],
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        eos_id=None,
        pad_id=PAD,
    )
    sets = [PromptSet(0, continuation_sequences(rows, refs), rows, refs, seconds)]
    return evaluate_draft(target, draft, sets, cfg, eos_id=None, pad_id=PAD, seed=0)


TIMINGS = {"cost_ratio", "speedup", "speedup_predicted", "target_only_seconds"}
TIMINGS |= {"spec_seconds_greedy", "draft_seconds", "target_seconds"}


def test_task_shards_give_the_metrics_of_one_pass(llamas):
    """The evaluate stage builds and judges each worker's tasks apart and merges them;
    `specdraft eval` does all tasks in one pass with the same functions: the same numbers."""
    target, drafts = llamas
    rows = eval_rows(8)
    tokenizer = TinyTokenizer(pad_token_id=PAD, eos_token_id=None)
    cfg = EvaluateConfig(gamma=3, temperature=1.0, max_new_tokens=6, batch_size=3)
    kwargs = dict(eos_id=None, pad_id=PAD, seed=5)
    tasks = task_indices(rows)
    one = evaluate_draft(
        target,
        drafts["near"],
        prompt_sets(target, tokenizer, rows, tasks, cfg, seed=5, spec_prompts=len(rows)),
        cfg,
        **kwargs,
    )
    merged, seconds = DraftRuns(), 0.0
    for task in tasks:  # a shard per task, merged in task order as the stage merges them
        sets = prompt_sets(target, tokenizer, rows, [task], cfg, seed=5, spec_prompts=len(rows))
        seconds += sum(s.target_only_seconds for s in sets)
        merged.merge(judge_draft(target, drafts["near"], sets, cfg, **kwargs))
    sharded = draft_metrics(merged, cfg, seconds)

    def strip(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in TIMINGS | {"per_prompt"}}

    assert strip(sharded) == strip(one)
    assert 0 < one["alpha"] < 1 and 0 < one["spec_alpha"] < 1  # the draft is judged, not copied
    assert sharded["per_prompt"] == one["per_prompt"]


def test_serve_check_replays_the_prompts_the_evaluation_decodes_speculatively(llamas):
    """spec_prompt_rows (serve-check's prompts) are the prompt sets' spec rows, task by task."""
    target, _ = llamas
    rows = eval_rows(9)
    tokenizer = TinyTokenizer(pad_token_id=PAD, eos_token_id=None)
    cfg = EvaluateConfig(gamma=2, temperature=1.0, max_new_tokens=2, batch_size=3)
    sets = prompt_sets(target, tokenizer, rows, task_indices(rows), cfg, seed=0, spec_prompts=3)
    decoded = [r for s in sets for r in s.spec_rows]
    assert decoded == spec_prompt_rows(rows, 3)
    assert [r["prompt"] for r in decoded] == ["p0", "p2", "p4", "p1", "p3", "p5"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_draft_equal_to_target_gives_alpha_one_and_tau_gamma_plus_one(llamas, batch_size):
    target, _ = llamas
    gamma = 3
    cfg = EvaluateConfig(gamma=gamma, temperature=1.0, max_new_tokens=3 * (gamma + 1))
    cfg.batch_size = batch_size
    m = run_evaluate(target, target, eval_rows(5), cfg)
    assert m["alpha"] == pytest.approx(1.0, abs=1e-5) and m["alpha_greedy"] == 1.0
    for bucket in m["position_buckets"].values():
        assert bucket["alpha"] == pytest.approx(1.0, abs=1e-5)
    for suffix in ("", "_greedy"):  # rejection sampling at T = 1 and greedy
        assert m[f"spec_alpha{suffix}"] == 1.0 and m[f"tau{suffix}"] == gamma + 1
        assert m[f"per_position{suffix}"] == [1.0] * gamma
        assert m[f"tau_predicted{suffix}"] == gamma + 1
    for task in m["tasks"].values():
        assert task["alpha"] == pytest.approx(1.0, abs=1e-5) and task["tau"] == gamma + 1
    assert m["lossless_greedy"] is True and m["num_spec_prompts"] == 5


def test_evaluate_batched_equals_batch_one_at_temperature_zero(llamas):
    """Rows of a batch are independent: the same spec stats, per task too, as one at a time."""
    target, drafts = llamas
    rows = eval_rows(7)
    results = []
    for batch_size in (1, 4):
        cfg = EvaluateConfig(gamma=4, temperature=0.0, max_new_tokens=14, batch_size=batch_size)
        refs, seconds = target_only_greedy(
            target,
            [r["prompt_ids"] for r in rows],
            batch_size=batch_size,
            max_new_tokens=14,
            eos_id=None,
            pad_id=PAD,
        )
        spec = spec_decoding(
            target,
            drafts["near"],
            rows,
            cfg,
            eos_id=None,
            pad_id=PAD,
            seed=0,
            greedy_references=refs,
            target_only_seconds=seconds,
        )
        results.append((refs, spec))
    (refs_1, one), (refs_4, four) = results
    assert refs_1 == refs_4
    keys = ("spec_alpha", "tau", "per_position", "spec_alpha_verified", "tau_predicted")
    for key in keys + tuple(f"{k}_greedy" for k in keys):
        assert one[key] == four[key], key
        for task in ("a", "b"):
            assert one["tasks"][task][key] == four["tasks"][task][key]
    assert 0 < one["spec_alpha"] < 1  # partial acceptance: the comparison means something
    assert one["batch_size"] == 1 and four["batch_size"] == 4
    assert one["cost_ratio"] > 0 and four["speedup"] > 0


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluate_fails_loudly_when_greedy_output_differs_from_the_reference(llamas, batch_size):
    target, drafts = llamas
    rows = eval_rows(3)
    cfg = EvaluateConfig(gamma=2, temperature=0.0, max_new_tokens=6, batch_size=batch_size)
    refs, seconds = target_only_greedy(
        target,
        [r["prompt_ids"] for r in rows],
        batch_size=batch_size,
        max_new_tokens=6,
        eos_id=None,
        pad_id=PAD,
    )
    refs[1] = refs[1][:-1] + [(refs[1][-1] + 1) % PAD]  # one wrong token in one reference
    with pytest.raises(LosslessError, match="1 prompt"):
        spec_decoding(
            target,
            drafts["near"],
            rows,
            cfg,
            eos_id=None,
            pad_id=PAD,
            seed=0,
            greedy_references=refs,
            target_only_seconds=seconds,
        )


def test_position_buckets_split_each_continuation_in_halves(llamas):
    target, drafts = llamas
    rows = eval_rows(4)
    lengths = [5, 4, 1, 6]  # response positions per continuation
    continuations = [list(range(1, n + 1)) for n in lengths]
    m = analytic_acceptance(
        target, drafts["near"], continuation_sequences(rows, continuations), PAD, 1.0
    )
    early, late = m["position_buckets"]["early"], m["position_buckets"]["late"]
    assert early["num_positions"] == 3 + 2 + 1 + 3 and late["num_positions"] == 2 + 2 + 0 + 3
    weighted = early["alpha"] * early["num_positions"] + late["alpha"] * late["num_positions"]
    assert m["alpha"] == pytest.approx(weighted / m["num_positions"])
    assert m["tasks"]["b"]["position_buckets"]["early"]["num_positions"] == 2 + 3


def test_tau_predicted():
    assert tau_predicted(0.0, 4) == 1.0 and tau_predicted(1.0, 4) == 5.0
    assert tau_predicted(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert math.isnan(tau_predicted(math.nan, 3))


# ---------------------------------------------------------------------------------------------
# Heads padded past the tokenizer, to different sizes in target and draft


REAL = 40  # the tokenizer's ids; target head 64 rows (V), draft head 52


def padded(logits_fn, rows: int, best_padding: int):
    """`logits_fn`'s real logits, widened to `rows` with padding id `best_padding` the argmax."""

    def fn(prefix):
        out = torch.full((rows,), -5.0)
        out[:REAL] = 4 * logits_fn(prefix)[:REAL]  # one real token with p ~ 1 - 1e-16 at T = 1
        out[best_padding] = 80.0  # a padded row that would win any argmax or sample it were in
        return out

    return fn


def count_up_real(prefix):
    return one_hot_logits((int(prefix[-1]) + 1) % REAL)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padding_rows_are_never_drafted_nor_emitted(temperature):
    target = StubLM(padded(count_up_real, V, best_padding=60))
    draft = StubLM(padded(count_up_real, 52, best_padding=45))
    prompt = torch.tensor([[5, 9, 3]])
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(max_new_tokens=12, temperature=temperature, generator=generator, vocab=REAL)
    spec, stats = speculative_generate(target, draft, prompt, gamma=3, **kwargs)
    alone = autoregressive_generate(target, prompt, **kwargs)
    batch, _ = speculative_generate_batch(target, draft, prompt.repeat(2, 1), gamma=3, **kwargs)
    expected = [(4 + i) % REAL for i in range(12)]
    assert spec.tolist() == alone.tolist() == expected
    assert all(row.tolist() == expected for row in batch)
    assert stats.accepted == stats.drafted  # over the real ids the two models agree
    # without `vocab` the padding rows win: what the slicing prevents
    assert speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=2)[0][0] == 60


# ---------------------------------------------------------------------------------------------
# The lossless check and near ties


class BlockAwareStub(StubLM):
    """A stub whose logits may depend on how many tokens a call feeds, as bf16 logits differ
    between a one-token decoding step and a verification block."""

    def __init__(self, logits_fn):
        super().__init__(logits_fn)
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # the evaluation reads a device

    def forward(self, input_ids, **kw):
        self.block = input_ids.shape[1]
        return super().forward(input_ids, **kw)


def tie_after_seven(stub: BlockAwareStub, delta: float):
    """count_up, except that after token 7 tokens 8 and 20 are tied up to `delta`: 20 wins by
    delta in a call feeding several tokens, 8 by delta in a one-token step."""

    def fn(prefix):
        logits = count_up(prefix)
        if int(prefix[-1]) == 7:
            logits[20] = logits[8] + (delta if stub.block > 1 else -delta)
        return logits

    return fn


def tie_run(delta: float, tolerance: float) -> dict:
    target = BlockAwareStub(lambda p: p)
    target.logits_fn = tie_after_seven(target, delta)
    rows = [{"prompt": "p", "prompt_ids": [5, 6], "task": "a"}]
    cfg = EvaluateConfig(
        gamma=3, temperature=0.0, max_new_tokens=6, batch_size=1, tie_tolerance=tolerance
    )
    refs, seconds = target_only_greedy(
        target, [[5, 6]], batch_size=1, max_new_tokens=6, eos_id=None, pad_id=PAD
    )
    assert refs == [[7, 8, 9, 10, 11, 12]]  # one-token steps: 8 wins the tie
    return spec_decoding(
        target,
        StubLM(count_up),
        rows,
        cfg,
        eos_id=None,
        pad_id=PAD,
        seed=0,
        greedy_references=refs,
        target_only_seconds=seconds,
    )


def test_an_exact_tie_broken_the_other_way_is_reported_not_raised():
    # the verification block picks 20 over the drafted 8 by 1e-3: the outputs part there
    metrics = tie_run(delta=1e-3, tolerance=0.02)
    assert metrics["lossless_greedy"] is True
    assert metrics["lossless_near_tie_mismatches"] == 1
    assert metrics["lossless_near_tie_rate"] == 1.0


def test_a_clear_mismatch_still_raises():
    with pytest.raises(LosslessError, match="tie_tolerance=0.02"):
        tie_run(delta=3.0, tolerance=0.02)  # 3.0 apart at a top logit of 10: no tie
    with pytest.raises(LosslessError, match="1 prompt"):
        tie_run(delta=1e-3, tolerance=0.0)  # tolerance 0: every difference fails


# --- acceptance under each drafting rule and the acceptance length an engine reports ----------


@pytest.mark.parametrize(
    ("acceptance", "gamma", "expected"),
    [
        ([1.0] * 9, 4, (7.0, 2.0)),  # rounds at 1 (accepts 1-4) and 6 (accepts 6-8)
        ([0.0] * 5, 4, (0.0, 4.0)),  # a round per position after the first
        # deterministic pattern, gamma 3: at 1 accept 1-2, at 4 accept 4-6, at 8 accept 8
        ([0.0, 1, 1, 0, 1, 1, 1, 1, 1, 0], 3, (6.0, 3.0)),
        # by hand: at 2, E[acc] = 0.5 in 1 round; at 1, 0.5 * (0 + 0.5) + 0.5 * 1 in 1.5 rounds
        ([0.0, 0.5, 0.5], 1, (0.75, 1.5)),
        ([1.0], 4, (0.0, 0.0)),  # the prefill's token alone: no round
    ],
)
def test_expected_rounds_by_hand(acceptance, gamma, expected):
    accepted, rounds = expected_rounds(acceptance, gamma)
    assert (accepted, rounds) == pytest.approx(expected)


def test_acceptance_length_is_vllm_pooled_definition():
    # an engine trace: four rounds accepting 2, 0, 3 and 1 drafts -> 1 + 6 / 4
    assert acceptance_length(6, 4) == 2.5 and acceptance_length(0, 0) is None


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predicted_rounds_equal_greedy_decoding(llamas, gamma, seed):
    """At T = 0 the prediction from per-position agreement is exact: specdraft's decoder (rounds
    from position 0, the last position never drafted) accepts and calls the target as predicted."""
    target, drafts = llamas
    ids = prompt_of(5, seed=seed)
    n = 24
    out, stats = speculative_generate(target, drafts["near"], ids, gamma=gamma, max_new_tokens=n)
    prompt = ids[0].tolist()
    sequence = {"input_ids": prompt + out.tolist(), "response_mask": [0] * 5 + [1] * n}
    agree = position_acceptance(target, drafts["near"], Collator(PAD)([sequence]), 0.0).agreement
    assert 0 < agree.mean() < 1  # the test means something only when some drafts are rejected
    accepted, rounds = expected_rounds(agree.tolist()[: n - 1] + [0.0], gamma, first=0)
    assert (accepted, rounds) == (stats.accepted, stats.target_calls)


def test_greedy_drafting_acceptance_on_hand_written_distributions():
    # identity heads: the hidden states are the logits
    eye = torch.eye(3)
    target = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    draft = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1]]))
    greedy = greedy_drafting_acceptance(draft, eye, target, eye, temperature=1.0)
    assert greedy.tolist() == pytest.approx([0.3, 0.6])  # p(argmax q) = p(1)
    sampled = token_acceptance(draft, eye, target, eye, temperature=1.0)
    assert sampled.tolist() == pytest.approx([0.2 + 0.3 + 0.1, 0.1 + 0.6 + 0.1])
    # at T = 0.5 the target sharpens: p_T(1) = 0.3^2 / (0.25 + 0.09 + 0.04)
    half = greedy_drafting_acceptance(draft, eye, target, eye, temperature=0.5)
    assert half[0] == pytest.approx(0.09 / 0.38)
    assert greedy_drafting_acceptance(draft, eye, target, eye, 0).tolist() == [0.0, 1.0]


def test_served_rule_is_the_jobs(llamas):
    target, drafts = llamas
    rows = eval_rows(4)
    continuations = [list(range(1, 9)) for _ in rows]
    sequences = continuation_sequences(rows, continuations)
    greedy = analytic_acceptance(target, drafts["near"], sequences, PAD, 1.0, drafting="greedy")
    sampled = analytic_acceptance(
        target, drafts["near"], sequences, PAD, 1.0, drafting="probabilistic"
    )
    by_rule = greedy["acceptance_by_rule"]
    assert by_rule == sampled["acceptance_by_rule"]
    assert by_rule["probabilistic"]["acceptance"] == pytest.approx(greedy["alpha"])
    assert by_rule["agreement_t0"]["acceptance"] == pytest.approx(greedy["alpha_greedy"])
    assert greedy["served"] == {
        "drafting": "greedy",
        "temperature": 1.0,
        **by_rule["greedy_drafting"],
    }
    assert sampled["served"]["acceptance"] == by_rule["probabilistic"]["acceptance"]
    assert by_rule["greedy_drafting"]["acceptance"] != by_rule["probabilistic"]["acceptance"]
    cold = analytic_acceptance(
        target, drafts["near"], sequences, PAD, 0.0, drafting="probabilistic"
    )
    assert cold["served"]["acceptance"] == cold["alpha_greedy"]  # T = 0: agreement, any rule
    assert greedy["tasks"]["a"]["served"]["drafting"] == "greedy"


def test_free_text_is_the_targets_own_writing_judged_like_the_prompts(llamas):
    """off_distribution: continuations the target samples from bos alone, judged by every rule."""
    from specdraft.pipeline.evaluation import free_text_sequences, off_distribution_acceptance

    target, drafts = llamas
    tok = type(
        "Tok",
        (),
        {"bos_token_id": 1, "eos_token_id": None, "pad_token_id": PAD, "__len__": lambda _: V},
    )()
    sequences = free_text_sequences(target, tok, 5, max_new_tokens=6, seed=0)
    assert len(sequences) == 5 and all(s["input_ids"][0] == 1 for s in sequences)
    assert all(s["response_mask"] == [0] + [1] * (len(s["input_ids"]) - 1) for s in sequences)
    assert len({tuple(s["input_ids"]) for s in sequences}) > 1  # sampled, not one greedy text
    again = free_text_sequences(target, tok, 5, max_new_tokens=6, seed=0)
    assert again == sequences  # seeded
    cfg = EvaluateConfig(gamma=3, temperature=1.0)
    near = off_distribution_acceptance(target, drafts["near"], sequences, PAD, cfg)
    far = off_distribution_acceptance(target, drafts["far"], sequences, PAD, cfg)
    direct = analytic_acceptance(target, drafts["near"], sequences, PAD, 1.0, gamma=3)
    assert near["served"] == direct["served"] and near["alpha"] == direct["alpha"]
    assert near["num_sequences"] == 5 and near["num_positions"] == direct["num_positions"]
    assert near["served"]["acceptance"] > far["served"]["acceptance"]


@pytest.mark.parametrize("batched", [False, True])
def test_sliding_window_targets_roll_back_past_their_window(batched):
    """Gemma-3's sliding-window layers drop states past the window unless told to record them: a
    rejected draft must still roll the caches back. A tiny Gemma-3 pair (window 4) decodes exactly
    the target's greedy text with a draft that is often rejected."""
    from tiny_gemma import tiny_gemma3

    target, draft = tiny_gemma3(40), tiny_gemma3(40, layers=2, seed=1)
    ids = torch.tensor([[2, 5, 6]])
    reference = autoregressive_generate(target, ids, max_new_tokens=14)
    if batched:  # left-padded with a shorter second row
        batch = torch.tensor([[2, 5, 6], [0, 2, 7]])
        outs, all_stats = speculative_generate_batch(
            target, draft, batch, batch.ne(0).long(), gamma=3, max_new_tokens=14
        )
        second = autoregressive_generate(target, torch.tensor([[2, 7]]), max_new_tokens=14)
        assert outs[1].tolist() == second.tolist()
        out, stats = outs[0], all_stats[0]
    else:
        out, stats = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=14)
    assert out.tolist() == reference.tolist()
    assert stats.drafted > stats.accepted  # rejections happened, so rollbacks crossed the window
