"""A tiny Gemma-3-shaped causal LM for tests: tied, scaled embeddings, sliding-window and
full-attention layers (window 4, so a few tokens cross it); and a word-level tokenizer laid out as
Gemma's."""

from __future__ import annotations

import torch


def tiny_gemma3(vocab: int, layers: int = 3, seed: int = 0):
    """`layers` of sliding, sliding, full attention (in that order), weights drawn from `seed`."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"][:layers],
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    return Gemma3ForCausalLM(config).eval()


def gemma_wordlevel_tokenizer(words: list[str], others: list[str]):
    """A SentencePiece-style WordLevel vocabulary laid out as Gemma's: <pad> 0, <eos> 1, <bos> 2,
    <unk> 3, the bare marker ▁ 4, then ▁word for each of `words`, then `others` as they are. Its
    Metaspace pre-tokenizer makes " a" "▁a" (the marker vLLM probes for)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    strings = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *(f"\u2581{w}" for w in words)]
    strings += others
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(strings)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
