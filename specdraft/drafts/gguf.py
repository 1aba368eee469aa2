"""GGUF checkpoints (llama.cpp's format) as targets and drafts.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) and dequantises it, but
the model it returns refuses `save_pretrained` (it is marked as quantised with gguf). The target and
draft_init stages therefore copy its weights into a plain model built from its config, without the
quantization_config, and write that once into their artifact as a safetensors directory with the
tokenizer: every later stage and the export load that directory. Needs the `gguf` extra.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import time
from pathlib import Path

from specdraft.errors import InputError

SUFFIX = ".gguf"
MAGIC = b"GGUF"


class GGUFError(InputError):
    """A GGUF that cannot be used (missing, damaged, or of an architecture transformers cannot
    dequantise); the message names the file and the fix."""


def is_gguf(name: str | Path) -> bool:
    return str(name).lower().endswith(SUFFIX)


def _located(path: str | Path) -> tuple[str, str]:
    """(folder, file name) of an existing GGUF file, after the checks that need no parsing."""
    file = Path(path).expanduser()
    if not file.exists():
        raise GGUFError(f"{path}: no such GGUF file")
    if not file.is_file():
        raise GGUFError(f"{path}: a GGUF checkpoint is one file; this is a directory")
    with open(file, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise GGUFError(
                f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)"
            )
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(
            f"{path}: reading a GGUF needs the gguf package: pip install 'specdraft[gguf]'"
        )
    return str(file.parent.resolve()), file.name


def _why(path: str | Path, err: Exception) -> str:
    import transformers

    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    unsupported = re.search(r"architecture (\S+) is not supported", first_line)
    if unsupported:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return (
            f"{path}: transformers {transformers.__version__} cannot dequantise GGUF architecture "
            f"{unsupported.group(1)!r} (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
            "give the model as a safetensors directory instead"
        )
    return (
        f"{path}: cannot read it as a GGUF checkpoint ({first_line}); the file may be truncated "
        "or damaged: download or convert it again"
    )


def _read(path, loader, **kwargs):
    folder, name = _located(path)
    try:
        return loader.from_pretrained(folder, gguf_file=name, **kwargs)
    except Exception as err:  # the gguf reader raises ValueError, struct.error, IndexError, ...
        raise GGUFError(_why(path, err)) from None


def gguf_config(path: str | Path):
    """The transformers config of a GGUF checkpoint; reads its metadata only (no tensors)."""
    from transformers import AutoConfig

    return _read(path, AutoConfig)


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF checkpoint (vocabulary, merges, special tokens, chat
    template), as a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    return _read(path, AutoTokenizer)


def load_gguf_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "auto"):
    """The GGUF checkpoint dequantised into a plain causal LM of its architecture, which
    save_pretrained writes like any other (no quantization_config)."""
    from transformers import AutoModelForCausalLM

    from specdraft.drafts.models import DTYPES, resolve_attention

    loaded, info = _read(path, AutoModelForCausalLM, dtype=DTYPES[dtype], output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise GGUFError(
            f"{path}: transformers found no weights in the file for {len(missing)} parameters "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be "
            "random. Give the model as a safetensors directory instead"
        )
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # what makes save_pretrained refuse the GGUF-loaded model
    model = AutoModelForCausalLM.from_config(
        config, dtype=DTYPES[dtype], attn_implementation=resolve_attention(attn_implementation)
    )
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()


def write_plain_model(path: str | Path, dst: Path, dtype: str) -> dict:
    """Dequantise the GGUF at `path` into `dst`: safetensors weights in `dtype`, config.json,
    generation_config.json and the tokenizer files. Returns what the stage's manifest records."""
    from specdraft.drafts.models import count_parameters

    started = time.perf_counter()
    tokenizer = gguf_tokenizer(path)
    model = load_gguf_model(path, dtype)
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)
    print(f"converted {path} ({model.config.model_type}) to safetensors in {dst}")
    return {
        "gguf": str(path),
        "parameters": count_parameters(model),
        "conversion_seconds": round(time.perf_counter() - started, 1),
    }
