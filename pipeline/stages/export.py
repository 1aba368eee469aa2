"""Stage `export`: the distilled draft as a plain HF causal-LM directory that serving stacks load:
merged safetensors weights, config.json, generation_config.json, the target's tokenizer files and a
model card saying how to serve it. The LoRA adapter is kept beside it in `adapter/`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from specdraft.drafts.models import copy_tokenizer_files, load_causal_lm
from specdraft.pipeline.config import ExportConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    lineage_hash,
    model_location,
    read_manifest,
)


def model_card(
    metrics: dict, base: str, target: str, data: str, gamma: int, method: str, job_hash: str
) -> str:
    final = metrics.get("final", {})
    rows = "\n".join(
        f"| {task} | {m.get('alpha', float('nan')):.3f} | {m.get('alpha_greedy', float('nan')):.3f} | "
        f"{m.get('tau', float('nan')):.2f} |"
        for task, m in sorted(final.get("tasks", {}).items())
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
base_model: {base}
tags: [speculative-decoding, draft-model, specdraft]
specdraft_job_hash: {job_hash}
---

# Draft model for `{target}`

Distilled by specdraft ({method}) on `{data}` to agree with the target in speculative decoding.
It shares the target's tokenizer and vocabulary size.

| task | alpha | alpha_greedy | tau (gamma={gamma}) |
|---|---|---|---|
{rows}
| **all** | {final.get("alpha", float("nan")):.3f} | {final.get("alpha_greedy", float("nan")):.3f} | {final.get("tau", float("nan")):.2f} |

alpha = mean Σ min(p, q) over target-generated continuations; tau = tokens per target call, bonus
included, from real speculative decoding at temperature {metrics.get("temperature")}.

## Serve it
- vLLM: `vllm serve {target} --speculative-config '{{"method": "draft_model", "model": "<this dir>", "num_speculative_tokens": {gamma}}}'`
- SGLang: `python -m sglang.launch_server --model-path {target} --speculative-algorithm STANDALONE --speculative-draft-model-path <this dir> --speculative-num-draft-tokens {gamma}`
- TensorRT-LLM: a `DraftTarget` speculative config with `speculative_model_dir=<this dir>` and `max_draft_len={gamma}`
- transformers: `target.generate(**inputs, assistant_model=AutoModelForCausalLM.from_pretrained("<this dir>"))`
"""


def run(cfg: ExportConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    draft_dir = ctx.out / "draft"
    export_draft(inputs, draft_dir, cfg.dtype)
    adapter = inputs["distil"] / "adapter"
    return {
        "draft": "draft",
        "adapter": "draft/adapter" if adapter.exists() else None,
        "dtype": cfg.dtype,
    }


def export_draft(inputs: dict[str, Path], draft_dir: Path, dtype: str) -> None:
    """Write the servable draft directory from a run's distil, target, evaluate and data artifacts."""
    model = load_causal_lm(model_location(inputs["distil"]), dtype=dtype)
    model.save_pretrained(draft_dir, safe_serialization=True)
    copy_tokenizer_files(model_location(inputs["target"]), draft_dir)
    adapter = inputs["distil"] / "adapter"
    if adapter.exists():  # kept beside the merged weights for users who want the adapter itself
        shutil.copytree(adapter, draft_dir / "adapter")
    metrics = json.loads((inputs["evaluate"] / "metrics.json").read_text())
    gamma = metrics.get("gamma", 4)
    distil_cfg = read_manifest(inputs["distil"])["config"]
    method = f"AdaSPEC-style selective KD, k={distil_cfg['k']}, {distil_cfg['divergence']}" + (
        ", LoRA merged" if distil_cfg["lora"]["enabled"] else ", full fine-tuning"
    )
    base = model_location(inputs["draft_init"]) if "draft_init" in inputs else "draft init"
    (draft_dir / "README.md").write_text(
        model_card(
            metrics,
            base,
            model_location(inputs["target"]),
            data_name(inputs["data"]),
            gamma,
            method,
            lineage_hash(inputs.values()),
        )
    )
    readable_like_other_files(draft_dir)


def readable_like_other_files(folder: Path) -> None:
    """Give every file and directory under `folder` the mode a new file of this user gets (0644
    and 0755 under the usual umask 022): safetensors writes its weights 0600, which a serving
    account other than ours cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def data_name(data_artifact: Path) -> str:
    source = read_manifest(data_artifact)["info"].get("source", "builtin")
    return "specdraft builtin toy world" if source == "builtin" else source
