"""Stage `distil`: selective-token KD (AdaSPEC). Tokens are scored by ΔL = KL(p‖q_draft) − KL(p‖q_ref);
the top-k fraction per micro-batch is kept and the draft (LoRA adapters by default) is trained with
the configured divergence on those tokens only. Adapters are merged for the saved model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from specdraft.drafts.models import device_for
from specdraft.pipeline.artifacts import load_model_artifact, load_tokenizer_artifact
from specdraft.pipeline.config import DistilConfig
from specdraft.pipeline.generate import load_sequences
from specdraft.pipeline.training import train_kd, write_json


def with_lora(model, lora_cfg):
    """Wrap `model` with PEFT LoRA adapters; fail clearly when the target modules match nothing."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora_cfg.target_modules if m not in names]
    if len(missing) == len(lora_cfg.target_modules):
        raise ValueError(
            f"distil.lora.target_modules {lora_cfg.target_modules} match no module of the draft; "
            f"linear layers here include: {sorted(n for n in names if n.endswith('proj'))[:12]}"
        )
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=[m for m in lora_cfg.target_modules if m in names],
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def delta_histogram(deltas: list[float], bins: int = 40) -> dict:
    if not deltas:
        return {"edges": [], "counts": []}
    values = torch.tensor(deltas)
    lo, hi = torch.quantile(values, 0.005).item(), torch.quantile(values, 0.995).item()
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(values.clamp(lo, hi), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


def run(cfg: DistilConfig, inputs: dict[str, Path], out: Path, *, seed: int) -> dict:
    device = device_for(cfg.resources.gpus)
    tokenizer = load_tokenizer_artifact(inputs["target"])
    teacher = load_model_artifact(inputs["target"], device)
    reference = load_model_artifact(inputs["reference"], device)
    model = load_model_artifact(inputs["draft_init"], device).train()
    if cfg.lora.enabled:
        model = with_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"distil: LoRA r={cfg.lora.r} on {cfg.lora.target_modules}: {trainable} trainable parameters"
        )
    sequences = load_sequences(inputs["generate"]).select_columns(["input_ids", "response_mask"])
    history, selection = train_kd(
        model,
        teacher,
        sequences,
        tokenizer,
        cfg.train,
        out,
        seed,
        reference=reference,
        k=cfg.k,
        divergence=cfg.divergence,
        beta=cfg.beta,
        temperature=cfg.temperature,
        normalize=cfg.normalize,
    )
    shutil.rmtree(out / "trainer", ignore_errors=True)
    if cfg.lora.enabled:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    deltas = selection["deltas"]
    threshold = None
    if deltas:
        ordered = sorted(deltas, reverse=True)
        threshold = ordered[max(0, min(len(ordered) - 1, int(cfg.k * len(ordered)) - 1))]
    write_json(out / "history.json", history)
    write_json(
        out / "selection.json",
        {
            "k": cfg.k,
            "threshold": threshold,
            "kept": selection["kept"],
            "total": selection["total"],
            "delta_histogram": delta_histogram(deltas),
        },
    )
    return {
        "model": "model",
        "adapter": "adapter" if cfg.lora.enabled else None,
        "final_loss": history[-1]["loss"] if history else None,
        "kept_fraction": selection["kept"] / max(1, selection["total"]),
    }
