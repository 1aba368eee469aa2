"""Model builders and loaders: toy Llama configs, and HF ids or directories for real pairs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def toy_llama(arch, tokenizer, max_positions: int, seed: int):
    """A freshly initialised Llama causal LM of the toy shape `arch` for `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        head_dim=getattr(arch, "head_dim", 0) or arch.hidden_size // arch.num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def resolve_attention(attn_implementation: str) -> str:
    """`auto`: FlashAttention-2 where flash-attn and a CUDA device are there, else PyTorch SDPA
    (which dispatches to FlashAttention kernels itself on CUDA)."""
    if attn_implementation != "auto":
        return attn_implementation
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(
    name_or_path: str | Path,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
):
    """Load a HF causal LM (safetensors weights) in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path),
        dtype=DTYPES[dtype],
        attn_implementation=resolve_attention(attn_implementation),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def device_for(gpus: float) -> torch.device:
    """The stage's device: its GPU (a DDP worker's own: LOCAL_RANK) when it asked for one."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(name_or_path: str | Path, dst: Path) -> list[str]:
    """Copy the target's tokenizer files byte for byte (a serving stack compares them to the
    target's); a hub id resolves through the local Hugging Face cache."""
    import shutil

    src = Path(name_or_path)
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(str(name_or_path), allow_patterns=list(TOKENIZER_FILES)))
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src}")
    return copied
