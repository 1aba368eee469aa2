"""Generation and evaluation sample from exactly softmax(logits / T): a checkpoint's own
generation_config (repetition penalty, n-gram bans, top-k/top-p/min-p, beams, a minimum length)
must not reach the sequences or alpha."""

from types import SimpleNamespace

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from specdraft.pipeline.sequences import sample_responses

VOCAB, PAD, EOS = 40, 0, 1
PROMPTS = [[5, 9, 12, 7], [3, 3, 8], [20, 21, 22, 23, 24], [11]]


def tiny_llama_with_generation_defaults():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    # What a released checkpoint's generation_config.json may hold; each changes what is sampled.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.3,
        repetition_penalty=5.0,
        no_repeat_ngram_size=1,
        top_k=3,
        top_p=0.5,
        min_p=0.2,
        min_new_tokens=6,
        suppress_tokens=[2, 3, 4],
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return model


@torch.no_grad()
def plain_sample(model, prompt, steps, temperature, seed):
    """The reference: draw each token from softmax(logits / T) (argmax at T = 0), stop at eos."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1].float()  # (1, V)
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
        else:
            token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        if out[-1] == EOS:
            break
        ids = torch.cat([ids, token], dim=1)
    return out


class TinyTokenizer(SimpleNamespace):
    def __len__(self) -> int:  # sample_responses samples over the tokenizer's ids
        return VOCAB


def sampled(model, temperature, seed):
    return sample_responses(
        model,
        TinyTokenizer(pad_token_id=PAD, eos_token_id=EOS),
        PROMPTS,
        max_new_tokens=12,
        temperature=temperature,
        batch_size=1,
        seed=seed,
        desc="test",
    )


def test_sampling_ignores_the_checkpoints_generation_config():
    model = tiny_llama_with_generation_defaults()
    seed = 3
    got = sampled(model, 1.0, seed)
    # sample_responses seeds batch i with seed * 1_000_003 + i (one prompt per batch here)
    want = [plain_sample(model, p, 12, 1.0, seed * 1_000_003 + i) for i, p in enumerate(PROMPTS)]
    assert got == want
    # a repeated token is allowed (the checkpoint's no_repeat_ngram_size=1 forbids it)
    assert any(len(set(r)) < len(r) for r in got)


def test_greedy_ignores_the_checkpoints_generation_config():
    model = tiny_llama_with_generation_defaults()
    got = sampled(model, 0.0, 0)
    assert got == [plain_sample(model, p, 12, 0.0, 0) for p in PROMPTS]


def test_the_checkpoints_generation_config_is_kept_on_the_model():
    model = tiny_llama_with_generation_defaults()
    sampled(model, 1.0, 0)
    assert model.generation_config.repetition_penalty == 5.0
    assert model.generation_config.suppress_tokens == [2, 3, 4]
