"""Stage `export`: the distilled draft as a plain HF causal-LM directory that serving stacks load:
merged safetensors weights, config.json, generation_config.json, the target's tokenizer files and a
model card saying how to serve it. The LoRA adapter is kept beside it in `adapter/`. A draft with
its own vocabulary keeps it, not padded to the target's rows: a trimmed draft its WordLevel
tokenizer and kept_ids.json, a draft with another tokenizer its tokenizer files and
vocabulary.json; its card says how vLLM serves it (use_heterogeneous_vocab).

Reads: `data`, `target`, `draft_init`, `distil`, `evaluate`
Writes: `draft/` (the servable directory); info `draft`, `adapter`, `dtype`

Model code shipped with a checkpoint runs per model, as in every stage: the draft's (a custom-code
draft is saved with its modules) when the job trusts the draft, the target's config and tokenizer
code when it trusts the target. `specdraft export` (commands/export_run.py) calls export_draft with
the run's own settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from specdraft.drafts.models import copy_tokenizer_files, load_causal_lm, load_tokenizer
from specdraft.drafts.pair import UNTRUSTED, ModelTrust
from specdraft.drafts.vocab_trim import (
    copy_draft_vocabulary,
    has_own_vocabulary,
    is_trimmed,
    served_map_for,
)
from specdraft.pipeline.config import ExportConfig
from specdraft.pipeline.engine.artifacts import (
    StageContext,
    lineage_hash,
    model_location,
    read_manifest,
)


def model_card(
    metrics: dict,
    base: str,
    target: str,
    data: str,
    gamma: int,
    method: str,
    job_hash: str,
    own_vocabulary: dict | None = None,
) -> str:
    final = metrics.get("final", {})
    rows = "\n".join(card_row(task, m) for task, m in sorted(final.get("tasks", {}).items()))
    rule = final.get("served") or {}
    drafting, temperature = (
        rule.get("drafting", metrics.get("drafting")),
        rule.get("temperature", metrics.get("temperature")),
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
{"It shares the target's tokenizer and vocabulary size." if own_vocabulary is None else vocabulary_note(own_vocabulary)}

| task | served | acceptance length (γ = {gamma}) | alpha | tau |
|---|---|---|---|---|
{rows}
{card_row("**all**", final)}

served = the acceptance of a drafted token under the rule it is served with ({drafting} drafting,
T = {temperature}), over target-written continuations of the job's held-out prompts; acceptance
length = 1 + accepted / drafts as vLLM reports it; alpha = Σ min(p, q), the acceptance had the
draft sampled; tau = tokens per target call, bonus included, from real speculative decoding.

{serve_mapped(target, gamma, own_vocabulary) if own_vocabulary is not None else SERVE_SAME.format(target=target, gamma=gamma)}"""


def card_row(name: str, m: dict) -> str:
    """One row of the card's table: served acceptance, acceptance length, alpha, tau."""
    served = m.get("served") or {}
    cells = [
        (served.get("acceptance"), ".3f"),
        (served.get("acceptance_length"), ".2f"),
        (m.get("alpha"), ".3f"),
        (m.get("tau"), ".2f"),
    ]
    text = ["n/a" if x is None else format(x, spec) for x, spec in cells]
    return f"| {name} | " + " | ".join(text) + " |"


def method_of(distil_cfg: dict) -> str:
    """The card's one-line account of how the draft was distilled (the distil stage's config)."""
    if distil_cfg.get("selection", "all") == "all":
        tokens = "KD on every response token"
    else:
        tokens = f"AdaSPEC-style selective KD ({distil_cfg['selection']} k = {distil_cfg['k']})"
    temperature = distil_cfg.get("temperature", 1.0)
    at = f" at temperature {temperature}" if temperature != 1.0 else ""
    training = "LoRA merged" if distil_cfg["lora"]["enabled"] else "full fine-tuning"
    return f"{tokens}, {distil_cfg['divergence']}{at}, {training}"


def vocabulary_note(own: dict) -> str:
    """What the card says of a draft with its own vocabulary (`own`: export_draft's record)."""
    if own["kind"] == "intersection":
        return (
            f"It has its own tokenizer, not the target's: {own['intersection']} of its "
            f"{own['rows']} tokens are token strings of the target's {own['target_rows']} (the "
            "intersection, which it was distilled over). A server maps ids by those strings."
        )
    return (
        f"Its vocabulary is trimmed (VocabTrim) to {own['rows']} of the target's "
        f"{own['target_rows']} tokens, the most frequent in the target's own responses: its "
        "embedding and LM head hold those rows only, and its tokenizer (a WordLevel vocabulary of "
        "exactly those token strings; `kept_ids.json` gives each one's target id) is read by "
        "token string, never used to segment text."
    )


def serve_mapped(target: str, gamma: int, own: dict) -> str:
    """How to serve a draft with its own vocabulary (trimmed, or another tokenizer): only vLLM
    maps a draft's vocabulary to the target's (by token string); SGLang and TensorRT-LLM refuse
    any difference. A target with sliding-window and full-attention layers (`own["hybrid"]`:
    Gemma-3) needs vLLM's hybrid KV-cache manager off: vLLM 0.32 refuses any draft_model for it
    otherwise."""
    kept = "the intersection" if own["kind"] == "intersection" else "the kept set"
    others = (  # transformers' assisted generation re-tokenises text: not for a WordLevel draft
        "- SGLang, TensorRT-LLM: not servable (they need the target's tokenizer)."
        if own["kind"] == "intersection"
        else "- SGLang, TensorRT-LLM, transformers' assisted generation: not servable (they need "
        "the target's tokenizer,\n  or re-tokenise text, which the draft's WordLevel tokenizer "
        "does not segment)."
    )
    engine = ""
    if own["hybrid"]:
        engine = (
            "\n  The target mixes sliding-window and full-attention layers: start the engine with "
            "`--disable-hybrid-kv-cache-manager` (`LLM(..., disable_hybrid_kv_cache_manager=True)`); "
            "vLLM 0.32 refuses any draft_model for such a target otherwise."
        )
    return f"""## Serve it
Only vLLM serves a draft whose vocabulary differs from the target's: it maps ids by token string,
feeds the draft the target's context (tokens outside {kept} as the draft's unk), masks the
draft's logits to {kept} and drafts greedily; the target verifies every token, so the output
is the target's.
- vLLM (≥ 0.32): `vllm serve {target} --speculative-config '{{"method": "draft_model", "model": "<this dir>", "num_speculative_tokens": {gamma}, "use_heterogeneous_vocab": true}}'`;
  in Python, `LLM(model="{target}", speculative_config={{"method": "draft_model", "model": "<this dir>", "num_speculative_tokens": {gamma}, "use_heterogeneous_vocab": True}})`.{engine}
{others}
"""


SERVE_SAME = """## Serve it
- vLLM: `vllm serve {target} --speculative-config '{{"method": "draft_model", "model": "<this dir>", "num_speculative_tokens": {gamma}}}'`
- SGLang: `python -m sglang.launch_server --model-path {target} --speculative-algorithm STANDALONE --speculative-draft-model-path <this dir> --speculative-num-draft-tokens {gamma}`
- TensorRT-LLM: a `DraftTarget` speculative config with `speculative_model_dir=<this dir>` and `max_draft_len={gamma}`
- transformers: `target.generate(**inputs, assistant_model=AutoModelForCausalLM.from_pretrained("<this dir>"))`
"""


def run(cfg: ExportConfig, inputs: dict[str, Path], ctx: StageContext) -> dict:
    draft_dir = ctx.out / "draft"
    export_draft(inputs, draft_dir, cfg.dtype, trust=ctx.trust)
    adapter = inputs["distil"] / "adapter"
    return {
        "draft": "draft",
        "adapter": "draft/adapter" if adapter.exists() else None,
        "dtype": cfg.dtype,
    }


def export_draft(
    inputs: dict[str, Path], draft_dir: Path, dtype: str, *, trust: ModelTrust = UNTRUSTED
) -> None:
    """Write the servable draft directory from a run's distil, target, evaluate and data artifacts;
    model code runs per model as `trust` (the job's settings) allows."""
    target = model_location(inputs["target"])
    own = write_servable_model(
        model_location(inputs["distil"]), target, draft_dir, dtype, trust=trust
    )
    adapter = inputs["distil"] / "adapter"
    if adapter.exists():  # kept beside the merged weights for users who want the adapter itself
        shutil.copytree(adapter, draft_dir / "adapter")
    metrics = json.loads((inputs["evaluate"] / "metrics.json").read_text())
    gamma = metrics.get("gamma", 4)
    distil_cfg = read_manifest(inputs["distil"])["config"]
    method = method_of(distil_cfg)
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
            own,
        )
    )
    readable_like_other_files(draft_dir)


def write_servable_model(
    model_dir: str, target: str, draft_dir: Path, dtype: str, *, trust: ModelTrust = UNTRUSTED
) -> dict | None:
    """Write the draft model at `model_dir` (a distilled or a starting draft of a run) into
    `draft_dir` as an engine loads it beside `target`: with the target's tokenizer and head rows,
    or, for a draft with its own vocabulary, its own tokenizer files and map. Returns what
    the card says of such a vocabulary (None for the target's own)."""
    model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=trust.draft)
    draft_dir.mkdir(parents=True, exist_ok=True)
    rows = target_vocab_size(target, trust_remote_code=trust.target)
    own = None
    if has_own_vocabulary(model_dir):  # trimmed or another tokenizer: mapped by vLLM
        copy_draft_vocabulary(model_dir, draft_dir)
        own = {
            "kind": "trimmed" if is_trimmed(model_dir) else "intersection",
            "rows": model.get_input_embeddings().weight.shape[0],
            "target_rows": rows,
            "hybrid": hybrid_attention(target, trust_remote_code=trust.target),
        }
        if own["kind"] == "intersection":
            tokenizer = load_tokenizer(target, trust_remote_code=trust.target)
            own["intersection"] = served_map_for(tokenizer, rows, model_dir).intersection
    else:
        copy_tokenizer_files(target, draft_dir)
        match_target_vocab_size(model, rows, draft_dir, trust_remote_code=trust.target)
    model.save_pretrained(draft_dir, safe_serialization=True)
    return own


def target_vocab_size(target: str, *, trust_remote_code: bool = False) -> int:
    """The target's embedding rows (config vocab_size, padding included)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    return int(config.get_text_config().vocab_size)


def hybrid_attention(target: str, *, trust_remote_code: bool = False) -> bool:
    """Whether the target's layers are of several attention kinds (sliding-window and full)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    return len(set(getattr(config.get_text_config(), "layer_types", None) or [])) > 1


def match_target_vocab_size(
    model, rows: int, tokenizer_dir: Path, *, trust_remote_code: bool = False
) -> None:
    """Give the draft the target's `rows` embedding and LM-head rows: vLLM's draft_model refuses a
    vocab_size that differs from the target's, while target and draft may be padded to different
    sizes past their one tokenizer (Qwen2.5-7B 152 064 rows, Qwen2.5-0.5B 151 936).

    Rows past the draft's are zero; rows past the target's are dropped (the pair check made sure
    both cover the tokenizer, so only padding goes). A zero head row gives the logit 0 exactly and
    no text encodes to its id; specdraft never drafts one (it compares over the tokenizer's ids),
    and should a serving engine's draft propose one, the target's verification rejects it, so the
    output stays the target's and the cost is one drafted token."""
    import torch
    from transformers import AutoTokenizer

    old = model.get_input_embeddings().weight.shape[0]
    if rows == old:
        return
    vocab = len(
        AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    )
    if rows < vocab:
        raise ValueError(
            f"the target has {rows} embedding rows, fewer than its tokenizer's {vocab} tokens"
        )
    model.resize_token_embeddings(rows, mean_resizing=False)  # config.vocab_size follows
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].zero_()
        model.get_output_embeddings().weight[old:].zero_()  # the same tensor when tied


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
    return "specdraft's builtin prompts (the toy world's tasks)" if source == "builtin" else source
