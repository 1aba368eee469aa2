"""Job configuration: typed dataclasses hold the only copy of every default.

A job YAML gives a partial override; `section.key=value` on the command line wins over the YAML.
`target=X`, `draft=X` and `data=X` set the section's main field (the model or the data source).
Validation collects every problem and raises one `ConfigError` listing them all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specdraft.errors import InputError
from specdraft.pipeline.engine.environment import environment_problems


class ConfigError(InputError):
    """A job that cannot run; `problems` lists every issue found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job:\n" + "\n".join(f"  - {p}" for p in problems))


# The largest count any integer setting may take unless its field says less: numpy seeds, torch
# sizes and step counters overflow past it, and a larger count is a typo, never a plan.
MAX_COUNT = 2**31 - 1


def opt(default: Any, help: str, *, lo=None, hi=None, lo_open=False, choices=None):
    """A config field with its help string and the range or choices that validation checks."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Resources:
    cpus: float = opt(1, "CPUs the stage's Ray task asks for.", lo=0)
    gpus: float = opt(0, "GPUs the stage's Ray task asks for (fractions share a GPU).", lo=0)
    workers: int = opt(
        1,
        "Data-parallel workers, each with the cpus and gpus above. generate: prompts sharded by "
        "whole batches over Ray tasks; evaluate: tasks spread over Ray tasks (both give the same "
        "output for any count); target and draft (builtin toy models), reference, distil: DDP "
        "through Ray Train's TorchTrainer, batch_size split evenly over the workers.",
        lo=1,
    )
    placement: str = opt(
        "",
        "Reserve the workers together in a Ray placement group with this strategy before any "
        "starts (STRICT_PACK: one node; SPREAD/STRICT_SPREAD: across nodes). Empty: generate and "
        "evaluate workers start as resources free up; training always gang-schedules (PACK).",
        choices=["", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
    )


@dataclass
class ToyArch:
    hidden_size: int = opt(128, "Toy model width.", lo=8)
    num_layers: int = opt(3, "Toy model depth.", lo=1)
    num_heads: int = opt(
        4, "Attention heads (hidden_size must divide by it unless head_dim is set).", lo=1
    )
    intermediate_size: int = opt(384, "MLP width.", lo=8)
    head_dim: int = opt(
        0,
        "Attention head width; 0 = hidden_size / num_heads. vLLM's CPU attention serves 32, 64, "
        "80, 96, 112, 128, 160, 192, 224, 256 and 512 only.",
        lo=0,
    )


@dataclass
class TrainConfig:
    steps: int = opt(300, "Optimizer steps.", lo=1)
    batch_size: int = opt(32, "Sequences per optimizer step.", lo=1)
    grad_accum: int = opt(
        1, "Micro-batches per optimizer step (batch_size must divide by it).", lo=1
    )
    lr: float = opt(
        3e-3, "Peak learning rate (linear warm-up 5 %, cosine decay).", lo=0, lo_open=True
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", lo=0)
    log_every: int = opt(10, "Log the loss every this many steps.", lo=1)
    save_every: int = opt(
        0,
        "Checkpoint every this many steps; a retried stage resumes from the last one (0 = off).",
        lo=0,
    )
    precision: str = opt(
        "fp32", "Mixed precision of training (bf16 autocast).", choices=["fp32", "bf16"]
    )
    packing: str = opt(
        "auto",
        "Batch layout: `packed` lays sequences end to end without padding (position_ids restart "
        "per sequence; varlen FlashAttention on GPU), `padded` right-pads them; `auto` packs when "
        "the model uses flash_attention_2.",
        choices=["auto", "packed", "padded"],
    )
    report_to: str = opt(
        "none",
        "Experiment tracker for Trainer (tensorboard/wandb need their package).",
        choices=["none", "tensorboard", "wandb"],
    )


@dataclass
class ModelConfig:
    model: str = opt("builtin", "HF model id, local directory, or `builtin` for the toy model.")
    dtype: str = opt("float32", "Weights dtype.", choices=["float32", "bfloat16", "float16"])
    attn_implementation: str = opt(
        "auto",
        "Attention kernel: `auto` = flash_attention_2 when flash-attn and a CUDA device are there, "
        "else sdpa.",
        choices=["auto", "sdpa", "eager", "flash_attention_2"],
    )
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint (off by default).")


@dataclass
class TargetConfig(ModelConfig):
    arch: ToyArch = field(
        default_factory=lambda: ToyArch(
            hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512
        ),
        metadata={"help": "Toy target shape."},
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=400, lr=3e-3),
        metadata={"help": "Toy target SFT (answer tokens only)."},
    )
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class DraftConfig(ModelConfig):
    arch: ToyArch = field(
        default_factory=lambda: ToyArch(
            hidden_size=48, num_layers=1, num_heads=2, intermediate_size=96, head_dim=32
        ),
        metadata={"help": "Toy draft shape (>= 8x fewer parameters than the target)."},
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=200, lr=3e-3),
        metadata={"help": "Toy draft pre-training (cross-entropy on whole sequences)."},
    )
    from_target_layers: int = opt(
        0,
        "Build the draft from the target's own first N decoder layers: its embeddings, layers "
        "0..N-1, final norm and LM head, saved as a plain model of the target's architecture "
        "(the natural draft when the target has no small sibling with its tokenizer). N must be "
        "below the target's depth; draft.model is then not used. 0 = off.",
        lo=0,
    )
    keep_vocab: int = opt(
        0,
        "Trim the draft's vocabulary (VocabTrim) to the K target token ids most frequent in the "
        "target-written training responses, plus bos/eos/pad/unk: its embedding and LM head keep "
        "those rows only (the `vocab_trim` stage, after `generate`), its tokenizer is a WordLevel "
        "vocabulary of exactly those token strings, and a serving engine maps it to the target by "
        "token string (vLLM: use_heterogeneous_vocab). Context tokens outside the set reach the "
        "draft as its unk; distillation compares the target's distribution over the kept ids. "
        "Below the target's vocabulary size; 0 = off (the draft keeps the target's vocabulary).",
        lo=0,
    )
    vocabulary: str = opt(
        "same",
        "`same`: the draft must have the target's tokenizer (the pair check refuses any "
        "difference). `intersection`: draft.model may have another tokenizer (e.g. SmolLM2 for a "
        "Gemma-3 target); it is served as vLLM serves it with use_heterogeneous_vocab: ids mapped "
        "by token string (the Ġ/▁ space markers read as a space), the target's context tokens "
        "outside the intersection reaching the draft as its unk, its logits masked to the "
        "intersection, greedy drafting only. Training feeds it the target's sequences mapped so "
        "and distils the target's distribution over the intersection; evaluation and the export "
        "(its own tokenizer, a card saying how to serve it) follow. Needs draft.model; not with "
        "from_target_layers or keep_vocab (those drafts have the target's own tokens).",
        choices=["same", "intersection"],
    )
    min_intersection: float = opt(
        0.5,
        "With draft.vocabulary=intersection: the least share of the draft's vocabulary whose "
        "token strings the target holds; the pair check refuses a draft below it. The rest of "
        "the draft's vocabulary is masked away when served, so below half the draft cannot "
        "propose most of what it learned to write and is a new model rather than a draft; two "
        "tokenizers made for the same language share far more (SmolLM2's with Gemma-3's: 93 %).",
        lo=0,
        hi=1,
    )
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class DataConfig:
    source: str = opt(
        "builtin",
        "`builtin` (the toy task suite), a JSONL/JSON/CSV/Parquet file or directory, a dataset "
        "saved with save_to_disk, or a hub dataset name (resolved through the datasets cache).",
    )
    prompt_field: str = opt("prompt", "Field holding the prompt.")
    response_field: str = opt(
        "response", "Field holding a reference response; empty = prompt-only data."
    )
    task_field: str = opt(
        "task", "Field naming the task of a row; rows without it are task `default`."
    )
    subset: str = opt("", "Configuration (subset) of a hub dataset, e.g. `main` for openai/gsm8k.")
    split: str = opt("train", "Split to read from a dataset with several splits.")
    eval_split: str = opt(
        "", "Split for evaluation; empty carves `eval_ratio` off the training split."
    )
    eval_ratio: float = opt(
        0.1,
        "Share of rows held out for evaluation when eval_split is empty.",
        lo=0,
        hi=0.9,
        lo_open=True,
    )
    limit: int = opt(0, "Use at most this many training rows (0 = all).", lo=0)
    chat_template: bool = opt(
        False, "Render prompts with the tokenizer's chat template (a user turn)."
    )
    train_per_task: int = opt(500, "Toy training examples per task family (builtin only).", lo=1)
    eval_per_task: int = opt(24, "Toy eval examples per task family (builtin only).", lo=1)
    vocab_size: int = opt(512, "Toy BPE vocabulary size (builtin only).", lo=300)
    max_length: int = opt(128, "Max tokens of prompt + response.", lo=16)


@dataclass
class GenerateConfig:
    num_prompts: int = opt(512, "Training prompts to answer.", lo=1)
    draft_fraction: float = opt(
        0.0,
        "Share of prompts answered by the draft (on-policy, DistillSpec); the rest by the target, "
        "after dataset_fraction. 0: no draft-written responses (target-written, or the dataset's "
        "own per dataset_fraction); the draft is then not an input of generate.",
        lo=0,
        hi=1,
    )
    dataset_fraction: float = opt(
        0.0, "Share of prompts that keep the dataset's own response (needs responses).", lo=0, hi=1
    )
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).", lo=0)
    max_new_tokens: int = opt(64, "Longest generated response.", lo=1)
    batch_size: int = opt(64, "Prompts per generation batch.", lo=1)
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class ReferenceConfig:
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=150, lr=2e-3),
        metadata={
            "help": "Reference: draft init distilled with forward KL on all response tokens."
        },
    )
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class LoraConfig:
    enabled: bool = opt(
        False,
        "Train LoRA adapters (PEFT), merged into the weights after training, instead of all "
        "weights; false trains every weight in full.",
    )
    r: int = opt(16, "Adapter rank.", lo=1)
    alpha: int = opt(32, "Adapter scaling numerator (scale = alpha / r).", lo=1)
    dropout: float = opt(0.0, "Adapter dropout.", lo=0, hi=1)
    target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters.",
    )
    modules_to_save: list = opt(
        [],
        "Modules trained in full beside the adapters (e.g. embed_tokens, lm_head); frozen if empty.",
    )


@dataclass
class DistilConfig:
    selection: str = opt(
        "all",
        "Tokens trained on: `all` (plain distillation on every response token; k and the "
        "reference are not used), `top` k by loss gap ΔL (AdaSPEC) or `bottom` k (the paper's "
        "ablation).",
        choices=["top", "bottom", "all"],
    )
    k: float = opt(
        0.4, "Fraction of response tokens kept by top/bottom selection.", lo=0, hi=1, lo_open=True
    )
    scope: str = opt(
        "microbatch",
        "Where the top-k threshold is taken: per `microbatch` (the public AdaSPEC code) or "
        "`global` (one threshold per optimizer step across accumulation and workers).",
        choices=["microbatch", "global"],
    )
    divergence: str = opt(
        "lk",
        "Training divergence: fkl KL(p‖q), rkl KL(q‖p), jsd (with beta), tvd, lk, the LK hybrid "
        "λ·KL + (1 − λ)·TV with λ = exp(−η·sg(α)), α as lk_alpha says, or ce, cross-entropy on "
        "the sequences' own tokens (no teacher: the SFT control of a comparison). All but ce are "
        "exact over the vocabulary at `temperature`.",
        choices=["fkl", "rkl", "jsd", "tvd", "lk", "ce"],
    )
    beta: float = opt(0.5, "JSD mixture weight (0 = fkl, 1 = rkl).", lo=0, hi=1)
    lk_eta: float = opt(3.0, "η of the LK hybrid.", lo=0)
    lk_alpha: str = opt(
        "batch",
        "α of the LK hybrid's λ = exp(−η·sg(α)): `token`, each token's own β = Σ min(p, q) "
        "(λ per token), or `batch`, the mean β over every response token of the optimizer "
        "step (accumulation window and workers; one λ per step, an extra no-grad forward of "
        "draft and target per micro-batch). Only with divergence=lk: left unset with another "
        "divergence it reads `token` (unused).",
        choices=["token", "batch"],
    )
    position_weighting: str = opt(
        "none",
        "Per-token loss weights from the draft's own acceptance β_t = Σ min(p, q) at "
        "`temperature` (stop-gradient), in γ-token blocks from each response's first token "
        "(γ = block_size; token t at offset j = (t − start) mod γ). `reach` (D-PACE's soft "
        "reach weighting; Spec-AUF's hard cut after the first predicted failure is its 0/1 "
        "version): w_t = Π_{i<j} β_{t−j+i}, the chance the draft's block reaches t, 1 for a "
        "block's first token. `accept_length` (specdraft's own weighting toward acceptance "
        "length, after PARD-2's aim; not PARD-2's weights): w_t = ∂τ/∂β_t with "
        "τ = Σ_{l<m} Π_{i≤l} β_i the block's expected accepted drafts, i.e. reach_t · (1 + "
        "β_{t+1} + β_{t+1}β_{t+2} + …) to the block's end (weights up to γ). The weighted sum "
        "is divided as `normalize` says; not with divergence=ce (no target distribution).",
        choices=["none", "reach", "accept_length"],
    )
    block_size: int = opt(
        4, "γ of position_weighting's blocks (evaluate.gamma's default).", lo=1, hi=64
    )
    k_search: list[float] | None = opt(
        None,
        "AdaSPEC's k chosen by held-out alpha: for each k here (in (0, 1]) a trial trains "
        "ceil(k_search_fraction · train.steps) steps from the initial draft with that k, and the "
        "k whose final held-out alpha (eval_every's held-out sequences) is best trains the full "
        "budget (ties: the first listed). Unset (null): no search, the fixed `k`; an empty list "
        "is an error. Needs selection top/bottom and eval_every > 0; the choice is in the "
        "manifest (k, k_search) and k_search.json.",
    )
    k_search_fraction: float = opt(
        0.25,
        "Share of train.steps each k_search trial trains (its own cosine schedule); a search "
        "over n values costs (1 + n · this) times the steps of one training.",
        lo=0,
        hi=1,
        lo_open=True,
    )
    fused_loss: bool = opt(
        True,
        "Chunked KD loss that never builds (tokens × vocab) logits; false = plain logits (benchmarks).",
    )
    temperature: float = opt(
        1.0,
        "Softmax temperature of the loss, of the loss gap ΔL that selects tokens, and of the "
        "held-out alpha (eval_every).",
        lo=0,
        lo_open=True,
    )
    normalize: str = opt(
        "all",
        "Divide the summed loss by `all` response tokens (AdaSPEC code) or by `kept` ones, "
        "counted over the optimizer step's accumulation window and all workers.",
        choices=["all", "kept"],
    )
    rounds: int = opt(
        1,
        "On-policy rounds: round r > 1 generates with round r − 1's draft and distils from it.",
        lo=1,
    )
    later_rounds: str = opt(
        "same",
        "Who writes the responses of rounds 2..R: `same` shares as generate (draft_fraction, "
        "dataset_fraction); `draft` all of them by the previous round's draft (warm-start on "
        "round 1's responses, then on-policy).",
        choices=["same", "draft"],
    )
    eval_every: int = opt(
        25,
        "Held-out alpha every this many steps; the best weights are kept (0 = keep the last).",
        lo=0,
    )
    holdout: float = opt(
        0.05, "Share of the training sequences held out for that alpha.", lo=0, hi=0.5, lo_open=True
    )
    stored_target_outputs: bool = opt(
        True,
        "Compute the frozen target's final hidden states for the training sequences once (stage "
        "target_outputs, one per round's sequences) and train reference and every distil round on "
        "them with the target's LM head; false runs the target forward at every step (the live "
        "path, kept for comparison). The reference follows the job's setting, a recipe its own.",
    )
    stored_k: int = opt(
        0,
        "With target_outputs.format=topk: read each token's first stored_k stored ids (the "
        "target's most likely), the mass of the others joining the tail bucket, as if the store "
        "had been made at k = stored_k; 0 reads all target_outputs.k. One store at the largest k "
        "then serves a comparison of smaller ones.",
        lo=0,
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, lr=3e-3))
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class VocabTrimConfig:
    """The vocab_trim stage's config, derived from the job (draft.keep_vocab): no section of
    its own."""

    keep_vocab: int = opt(0, "Rows the trimmed draft keeps (draft.keep_vocab).", lo=0)
    resources: Resources = field(default_factory=lambda: Resources(cpus=1))


# Default k of target_outputs.format=topk: 128 ids cost 6 * 128 + 2 = 770 bytes a token (int32 ids,
# fp16 log-probabilities, the fp16 log of the rest), the largest power of two within the 1 KB a
# token the store aims at; the KD loss's cost hardly depends on k (the draft's logits dominate).
TOPK_DEFAULT_K = 128


@dataclass
class TargetStoreConfig:
    """The job section `target_outputs`: what the target_outputs stage stores for KD (used when
    distil.stored_target_outputs is on)."""

    format: str = opt(
        "hidden",
        "What is stored per training token: `hidden`, the target's final hidden states and its "
        "LM head (exact; H values a token), or `topk`, the target's k most likely token ids "
        "(int32) and their log-probabilities at distil.temperature (fp16) with the log of the "
        "rest of its mass (6k + 2 bytes a token, whatever the target's width); the KD losses "
        "then compare over those ids plus one bucket for the rest, exact at k = V.",
        choices=["hidden", "topk"],
    )
    k: int = opt(
        TOPK_DEFAULT_K,
        "Token ids stored per token with format=topk (770 bytes a token at 128); above the "
        "vocabulary, all of it (exact). Unused with format=hidden.",
        lo=1,
    )
    workers: int = opt(
        1,
        "Ray workers that run the target over the stage's resumable parts (512 sequences each), "
        "each with distil.resources' cpus and gpus and its own copy of the target; the stored "
        "rows are the same for any count.",
        lo=1,
    )


@dataclass
class TargetOutputsConfig:
    """The target_outputs stage's settings: derived from the job by engine/job.py, so that its key
    follows what the stored outputs depend on and nothing else."""

    precision: str = opt(
        "fp32",
        "Autocast of the target forward and dtype of the stored hidden states: bf16 when every "
        "stage that reads them trains in bf16 (their train.precision), fp32 otherwise.",
        choices=["fp32", "bf16"],
    )
    batch_size: int = opt(16, "Sequences per target forward.", lo=1)
    format: str = opt(
        "hidden", "target_outputs.format: `hidden` or `topk`.", choices=["hidden", "topk"]
    )
    k: int = opt(0, "target_outputs.k with format=topk; 0 with format=hidden.", lo=0)
    temperature: float = opt(
        0.0,
        "distil.temperature with format=topk (the log-probabilities are at it); 0 with "
        "format=hidden, which does not depend on it.",
        lo=0,
    )
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class EvaluateConfig:
    gamma: int = opt(4, "Drafted tokens per speculative round.", lo=1)
    temperature: float = opt(
        1.0, "Temperature of alpha and of sampled speculative decoding (greedy is run too).", lo=0
    )
    drafting: str = opt(
        "greedy",
        "How the serving engine drafts: `greedy` (the draft's argmax, vLLM's and SGLang's default and "
        "the only rule for mapped vocabularies) or `probabilistic` (a token sampled from the draft; "
        "vLLM's draft_sample_method=probabilistic). The metrics' `served` entry, the headline of "
        "reports and the history, is this rule's acceptance at `temperature`.",
        choices=["greedy", "probabilistic"],
    )
    max_new_tokens: int = opt(48, "Tokens generated per eval prompt.", lo=1)
    prompts_per_task: int = opt(16, "Eval prompts per task for alpha.", lo=1)
    spec_prompts_per_task: int = opt(
        6, "Eval prompts per task for real speculative decoding.", lo=1
    )
    prompt_offset: int = opt(
        0,
        "Skip each task's first N eval prompts: a confirmation run with N = the screen's "
        "prompts_per_task is judged on prompts the screen never saw.",
        lo=0,
    )
    free_text_prompts: int = opt(
        16,
        "Continuations the target samples from its bos token alone, where every draft's acceptance "
        "is measured too (metrics' off_distribution.free_text): traffic unlike the job's prompts. "
        "0 = off.",
        lo=0,
    )
    batch_size: int = opt(
        8,
        "Prompts per batch of real speculative decoding and of its target-only baseline; rows "
        "accept drafts independently (1 = one prompt at a time).",
        lo=1,
    )
    tie_tolerance: float = opt(
        0.02,
        "Lossless check: a greedy speculative output that leaves the target-only one where both "
        "tokens' target logits lie within tie_tolerance * max(1, |top logit|) of the top logit "
        "(relative; 0.02 is ~5 bf16 steps of 2^-8) is a near tie, counted in "
        "lossless_near_tie_rate, not a failure; 0 makes every difference fail.",
        lo=0,
    )
    resources: Resources = field(default_factory=lambda: Resources(cpus=2))


@dataclass
class ExportConfig:
    dtype: str = opt(
        "float32", "dtype of the exported draft.", choices=["float32", "bfloat16", "float16"]
    )


@dataclass
class ReportConfig:
    title: str = opt("", "Report title; empty uses the job name.")


@dataclass
class RayConfig:
    enabled: bool = opt(True, "Run stages as Ray tasks (false: in this process).")
    address: str = opt("", "Existing cluster to attach to; empty starts a local instance.")


@dataclass
class JobConfig:
    name: str = opt("demo", "Job name; outputs go to runs/<name>/ unless --out is given.")
    seed: int = opt(0, "Seed of data, training and sampling.", lo=0)
    store: str = opt("", "Artifact store; empty = $SPECDRAFT_STORE or ~/.cache/specdraft/store.")
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    target_outputs: TargetStoreConfig = field(default_factory=TargetStoreConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# `target=X` on the command line or `target: X` in YAML sets this field of the section.
SHORTHAND = {"target": "model", "draft": "model", "data": "source"}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against a simple field type; strings from the command line are parsed."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{key}: expected true/false, got {_show(value)}")
        return None
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected an integer, got {_show(value)}")
        return None
    if typ is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        expected = "a finite number" if number is not None else "a number"
        problems.append(f"{key}: expected {expected}, got {_show(value)}")
        return None
    if typ is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and "\0" not in value:
            return value
        problems.append(f"{key}: expected a string without NUL characters, got {_show(value)}")
        return None
    if typing.get_args(typ) == (float,) and typing.get_origin(typ) is list:
        if isinstance(value, str):  # `a,b` from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            numbers = [_coerce(v, float, f"{key}[{i}]", problems) for i, v in enumerate(value)]
            return None if None in numbers else numbers
        problems.append(f"{key}: expected a list of numbers, got {_show(value)}")
        return None
    if typ is list or typing.get_origin(typ) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) and "\0" not in v for v in value):
            return value
        problems.append(f"{key}: expected a list of strings, got {_show(value)}")
        return None
    raise TypeError(f"unsupported config type {typ} for {key}")


def _check_range(value: Any, meta: dict, key: str, problems: list[str]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        problems.append(f"{key}: {_show(value)} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if hi is None and isinstance(value, int) and not isinstance(value, bool):
        hi = MAX_COUNT
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        problems.append(f"{key}: {value} is out of range, must be {bound}")
    if hi is not None and value > hi:
        problems.append(f"{key}: {value} is out of range, must be <= {hi}")


def _apply(obj: Any, data: dict, prefix: str, problems: list[str]) -> None:
    """Set fields of dataclass `obj` from nested dict `data`, collecting problems."""
    types_ = _field_types(type(obj))
    for raw_key, value in data.items():
        shown = raw_key if isinstance(raw_key, str) and len(raw_key) <= 80 else _show(raw_key)
        key = f"{prefix}{shown}"
        if raw_key not in types_:
            known = ", ".join(types_)
            problems.append(f"{key}: unknown key (known keys here: {known})")
            continue
        typ, f = types_[raw_key]
        if type(None) in typing.get_args(typ):  # `X | None`: null unsets it
            if value is None:
                setattr(obj, raw_key, None)
                continue
            typ = next(arg for arg in typing.get_args(typ) if arg is not type(None))
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict) and raw_key in SHORTHAND and prefix == "":
                value = {SHORTHAND[raw_key]: value}
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping of settings, got {_show(value)}")
                continue
            _apply(getattr(obj, raw_key), value, key + ".", problems)
            continue
        coerced = _coerce(value, typ, key, problems)
        if coerced is not None:
            _check_range(coerced, f.metadata, key, problems)
            setattr(obj, raw_key, coerced)


def _dotted_to_nested(overrides: list[str], problems: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"{_show(item)}: overrides look like section.key=value")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML (`[1,`): a plain string, which type checking names if wrong
        except ConfigError as err:  # too deep, too big or duplicate keys
            problems.extend(err.problems)
            continue
        if isinstance(value, dict):
            value = raw  # a mapping is never a field value: let type checking name the key
        if len(parts) == 1 and parts[0] in SHORTHAND:
            parts, value = [parts[0], SHORTHAND[parts[0]]], value
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{key}: conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return nested


def _cross_checks(cfg: JobConfig, problems: list[str]) -> None:
    for section in ("target", "draft"):
        arch = getattr(cfg, section).arch
        if not arch.head_dim and arch.hidden_size % arch.num_heads:
            problems.append(
                f"{section}.arch.hidden_size ({arch.hidden_size}) must be divisible by "
                f"{section}.arch.num_heads ({arch.num_heads})"
            )
    for name in ("target", "draft", "reference", "distil"):  # the trained stages
        train, workers = getattr(cfg, name).train, getattr(cfg, name).resources.workers
        if train.batch_size % (train.grad_accum * workers):
            split = f"{name}.train.grad_accum ({train.grad_accum})"
            if workers > 1:
                split = (
                    f"{name}.train.grad_accum x {name}.resources.workers ({train.grad_accum} x "
                    f"{workers}): each worker takes an equal share"
                )
            problems.append(
                f"{name}.train.batch_size ({train.batch_size}) must be divisible by {split}"
            )
    offset = cfg.evaluate.prompt_offset
    if cfg.data.source == "builtin" and offset >= cfg.data.eval_per_task:
        problems.append(
            f"evaluate.prompt_offset ({offset}) leaves none of the toy world's "
            f"data.eval_per_task ({cfg.data.eval_per_task}) eval prompts per task; raise "
            "data.eval_per_task"
        )
    layers = cfg.draft.from_target_layers
    if layers and cfg.draft.model != "builtin":
        problems.append(
            f"draft.model and draft.from_target_layers: the draft is built from the target's first "
            f"{layers} layers, so draft.model ({cfg.draft.model!r}) would not be used; leave it "
            "unset, or set draft.from_target_layers=0 to use it"
        )
    elif layers and cfg.target.model == "builtin" and layers >= cfg.target.arch.num_layers:
        problems.append(
            f"draft.from_target_layers: {layers} must be below the toy target's depth "
            f"(target.arch.num_layers = {cfg.target.arch.num_layers})"
        )
    _keep_vocab_checks(cfg, problems)
    _intersection_checks(cfg, problems)
    if cfg.data.chat_template and cfg.target.model == "builtin":
        problems.append(
            "data.chat_template: the builtin toy target's tokenizer has no chat template; "
            "set it to false or give a target with one"
        )
    if cfg.target.model == "builtin" and cfg.data.source != "builtin":
        problems.append(
            f"data.source ({_show(cfg.data.source)}) with the builtin toy pair: the toy target and "
            "draft learn the toy task suite with its own tokenizer, so they cannot train on your "
            "data; give target= and draft= (models with a tokenizer), or set data=builtin"
        )
    if not layers and (cfg.target.model == "builtin") != (cfg.draft.model == "builtin"):
        problems.append(
            "target.model and draft.model: use `builtin` for both (the toy pair shares a tokenizer) "
            "or give both as model ids/directories"
        )
    if cfg.generate.draft_fraction + cfg.generate.dataset_fraction > 1 + 1e-9:
        problems.append(
            f"generate.draft_fraction ({cfg.generate.draft_fraction}) + generate.dataset_fraction "
            f"({cfg.generate.dataset_fraction}) exceed 1; the target answers what is left"
        )
    for name in ("target", "draft"):
        section = getattr(cfg, name)
        used = f"{name}.model {section.model!r} is used as given"
        if getattr(section, "from_target_layers", 0):
            used = "the draft is cut from the target's layers"
        elif section.model == "builtin":
            used = ""
        if used and section.resources.workers > 1:
            problems.append(
                f"{name}.resources.workers: {used}, not trained (workers > 1 trains the builtin "
                "toy model with DDP); set it to 1"
            )
    for name in ("target", "draft", "generate", "reference", "distil", "evaluate"):
        res = getattr(cfg, name).resources
        if res.placement and res.workers == 1:
            problems.append(
                f"{name}.resources.placement: {res.placement} places workers; with "
                f"{name}.resources.workers=1 there is nothing to place (set workers > 1, or clear it)"
            )
        if res.placement and not (res.cpus or res.gpus):
            problems.append(
                f"{name}.resources.placement: a placement group reserves cpus or gpus; "
                f"{name}.resources asks for neither"
            )
    if cfg.distil.later_rounds != "same" and cfg.distil.rounds == 1:
        problems.append(
            f"distil.later_rounds: {cfg.distil.later_rounds} sets how rounds 2..R generate; "
            "with distil.rounds=1 there are none (raise rounds, or leave it at `same`)"
        )
    _objective_checks(cfg.distil, problems)
    _target_store_checks(cfg, problems)
    if cfg.distil.lora.enabled and not cfg.distil.lora.target_modules:
        problems.append(
            "distil.lora.target_modules: empty; name the modules to adapt or set lora.enabled=false"
        )
    if (
        not cfg.name
        or len(cfg.name) > 100
        or not cfg.name.isprintable()
        or any(c in cfg.name for c in "/\\")
        or cfg.name.startswith(".")
    ):
        problems.append(
            f"name: {cfg.name!r} must be a plain directory name (printable, no / or \\, not "
            "starting with a dot, at most 100 characters)"
        )


def _keep_vocab_checks(cfg: JobConfig, problems: list[str]) -> None:
    """A trimmed draft (draft.keep_vocab) against what it cannot do yet; its size against the
    target's vocabulary is checked with the models, before any stage runs (job.check_models)."""
    keep = cfg.draft.keep_vocab
    if not keep:
        return
    if cfg.target.model == "builtin" and keep >= cfg.data.vocab_size:
        problems.append(
            f"draft.keep_vocab={keep}: the toy tokenizer has at most data.vocab_size "
            f"({cfg.data.vocab_size}) tokens, so nothing would be trimmed; give a smaller count, "
            "or 0 to keep the whole vocabulary"
        )
    if cfg.generate.draft_fraction or cfg.distil.later_rounds == "draft":
        problems.append(
            f"draft.keep_vocab={keep} with the draft writing training sequences "
            f"(generate.draft_fraction={cfg.generate.draft_fraction}, distil.later_rounds="
            f"{cfg.distil.later_rounds}): a trimmed draft is made from the target's sequences "
            "and does not sample them; set draft_fraction=0 and later_rounds=same, or keep_vocab=0"
        )
    for section in ("distil", "reference"):
        divergence = getattr(getattr(cfg, section), "divergence", None)
        if divergence == "ce":
            problems.append(
                f"{section}.divergence=ce with draft.keep_vocab={keep}: cross-entropy on the data's "
                "tokens needs a draft row for every token; use a KD divergence (fkl, lk, ...)"
            )


def _intersection_checks(cfg: JobConfig, problems: list[str]) -> None:
    """A draft with another tokenizer (draft.vocabulary=intersection) against what it cannot do;
    the intersection's size against draft.min_intersection is checked with the models, before
    any stage runs (job.check_models)."""
    if cfg.draft.vocabulary != "intersection":
        return
    opted = "draft.vocabulary=intersection"
    if cfg.draft.from_target_layers:
        problems.append(
            f"{opted} with draft.from_target_layers={cfg.draft.from_target_layers}: a draft cut "
            "from the target has the target's tokenizer; set draft.vocabulary=same"
        )
    elif cfg.draft.model == "builtin":
        problems.append(
            f"{opted} with the builtin toy draft: the toy pair shares one tokenizer; give "
            "draft.model (a model with another tokenizer), or set draft.vocabulary=same"
        )
    if cfg.draft.keep_vocab:
        problems.append(
            f"{opted} with draft.keep_vocab={cfg.draft.keep_vocab}: keep_vocab trims the target's "
            "vocabulary for a draft that has it, and a draft with another tokenizer is masked to "
            "the intersection when served; set one of them"
        )
    if cfg.generate.draft_fraction or cfg.distil.later_rounds == "draft":
        problems.append(
            f"{opted} with the draft writing training sequences (generate.draft_fraction="
            f"{cfg.generate.draft_fraction}, distil.later_rounds={cfg.distil.later_rounds}): the "
            "draft samples in its own tokens, not the target's; set draft_fraction=0 and "
            "later_rounds=same"
        )
    for section in ("distil", "reference"):
        if getattr(getattr(cfg, section), "divergence", None) == "ce":
            problems.append(
                f"{section}.divergence=ce with {opted}: cross-entropy on the data's tokens needs "
                "a draft row for every target token; use a KD divergence (fkl, lk, ...)"
            )


def _target_store_checks(cfg: JobConfig, problems: list[str]) -> None:
    """target_outputs.format=topk against the settings that need the target itself."""
    distil = cfg.distil
    if cfg.target_outputs.format != "topk":
        if distil.stored_k:
            problems.append(
                f"distil.stored_k={distil.stored_k} with target_outputs.format="
                f"{cfg.target_outputs.format}: stored_k reads part of a top-k store; set "
                "target_outputs.format=topk or distil.stored_k=0"
            )
        return
    if distil.stored_k > cfg.target_outputs.k:
        problems.append(
            f"distil.stored_k={distil.stored_k} above target_outputs.k={cfg.target_outputs.k}: "
            "the store holds k ids a token; raise target_outputs.k or lower distil.stored_k"
        )
    if not distil.stored_target_outputs:
        problems.append(
            "target_outputs.format=topk with distil.stored_target_outputs=false: the top-k is "
            "what the target_outputs stage stores, and false runs the target live instead; set "
            "distil.stored_target_outputs=true, or target_outputs.format=hidden"
        )
    if not distil.fused_loss:
        problems.append(
            "target_outputs.format=topk with distil.fused_loss=false: the plain loss builds the "
            "target's full logits, which a top-k store does not have; set distil.fused_loss=true "
            "or target_outputs.format=hidden"
        )


def _objective_checks(distil: DistilConfig, problems: list[str]) -> None:
    """The acceptance-aware objectives against the divergence and selection they need."""
    if distil.position_weighting != "none" and distil.divergence == "ce":
        problems.append(
            f"distil.position_weighting={distil.position_weighting} with distil.divergence=ce: the "
            "weights come from the draft's acceptance Σ min(p, q) against the target, which ce "
            "does not read; use fkl, rkl, jsd, tvd or lk, or position_weighting=none"
        )
    if distil.lk_alpha != "token" and distil.divergence != "lk":
        problems.append(
            f"distil.lk_alpha={distil.lk_alpha} with distil.divergence={distil.divergence}: "
            "lk_alpha sets the LK hybrid's α; set divergence=lk or lk_alpha=token"
        )
    if distil.k_search == []:
        problems.append(
            f"distil.k_search=[] with distil.selection={distil.selection}: a k-search over an "
            "empty grid tries no k; list the shares to try (e.g. distil.k_search=0.2,0.4,0.6,1.0) "
            f"or unset it (k_search: null, or distil.k_search=null) for the fixed distil.k={distil.k}"
        )
    grid = distil.k_search or []
    if grid and distil.selection == "all":
        problems.append(
            f"distil.k_search {grid} with distil.selection=all: k is the share top/bottom "
            "selection keeps; set selection=top (or bottom), or leave k_search unset"
        )
    if grid and not distil.eval_every:
        problems.append(
            f"distil.k_search {grid} with distil.eval_every=0: k is chosen by held-out alpha, "
            "and eval_every=0 holds nothing out; set eval_every > 0, or leave k_search unset"
        )
    outside = [k for k in grid if not 0 < k <= 1]
    if outside:
        problems.append(
            f"distil.k_search: {outside} outside (0, 1]: each value is a share of tokens kept "
            f"(distil.selection={distil.selection})"
        )
    if len(set(grid)) != len(grid):
        problems.append(f"distil.k_search: {grid} lists a value twice")


def load_job(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a JobConfig from an optional YAML file and `key=value` overrides; raise ConfigError
    listing every problem, the SPECDRAFT_* environment variables' among them."""
    data = read_job_yaml(path) if path is not None else {}
    if "compare" in data:
        raise ConfigError([f"{path} is a comparison: run it with `specdraft compare {path}`"])
    environment = environment_problems()
    try:
        cfg = job_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(err.problems + environment) from None
    if environment:
        raise ConfigError(environment)
    return cfg


def read_job_yaml(path: str | Path) -> dict:
    """The settings mapping of a job YAML file; ConfigError if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"job file {path} does not exist"])
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8"]
        ) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror})"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML ({err})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return data


# A job is a few hundred values a few levels deep; a file beyond these bounds is a mistake or an
# attack (aliases that expand a 600-byte file to 9^9 values), refused before it is built.
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 10_000
MERGE_TAG = "tag:yaml.org,2002:merge"

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _show(value: Any) -> str:
    """`value` for a message: its repr, cut short (a job may hold a huge value)."""
    return _REPR.repr(value)


class _JobLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing what a job never needs: nesting deeper than MAX_YAML_DEPTH
    (checked while composing, before Python's recursion limit) and keys given twice in one
    mapping (collected in `duplicates`; yaml would keep the last silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0
        self.duplicates: list[str] = []

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError([f"nested deeper than {MAX_YAML_DEPTH} levels (line {line})"])
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<:` merges may be overridden; unhashable keys yaml itself refuses
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                self.duplicates.append(
                    f"key {_show(key)} is given twice in one mapping (lines {first[key]} and "
                    f"{line}); yaml would keep the second silently: merge them into one"
                )
            first.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(values, depth) of the composed YAML graph `root` with every alias expanded, each node
    measured once and without recursion; ConfigError when an alias refers to its own container."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    started: set[int] = set()  # on the current path from the root
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else (node.value if isinstance(node, yaml.SequenceNode) else [])
        )
        if finished:
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            depth[id(node)] = 1 + max((depth[id(k)] for k in kids), default=0)
            started.discard(id(node))
            continue
        if id(node) in size:
            continue
        started.add(id(node))
        stack.append((node, True))
        for kid in kids:
            if id(kid) in started:
                line = kid.start_mark.line + 1
                raise ConfigError([f"an alias refers to a value that contains it (line {line})"])
            if id(kid) not in size:
                stack.append((kid, False))
    return size[id(root)], depth[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document `text` (from `where`, for messages), loaded safely: ConfigError for
    nesting deeper than MAX_YAML_DEPTH, aliases expanding past MAX_YAML_VALUES values or
    MAX_YAML_DEPTH levels, and duplicate keys. yaml.YAMLError for text that is not YAML."""
    loader = _JobLoader(text)
    try:
        try:
            node = loader.get_single_node()
            values, depth = (0, 0) if node is None else _expanded_size(node)
        except ConfigError as err:
            raise ConfigError([f"{where}: {p}" for p in err.problems]) from None
        if node is None:
            return None
        if values > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            raise ConfigError(
                [
                    f"{where}: expands (through its aliases) to more than {MAX_YAML_VALUES} "
                    f"values or {MAX_YAML_DEPTH} levels; a job needs far fewer. Write the values "
                    "out instead of repeating aliases"
                ]
            )
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{where}: {p}" for p in loader.duplicates])
    return data


def job_from_dict(data: dict, overrides: list[str] | None = None) -> JobConfig:
    """A JobConfig from YAML-shaped `data` and `key=value` overrides; raise ConfigError."""
    problems: list[str] = []
    cfg = JobConfig()
    _apply(cfg, copy.deepcopy(data), "", problems)
    nested = _dotted_to_nested(overrides or [], problems)
    _apply(cfg, nested, "", problems)
    named = any(
        isinstance(s.get("distil"), dict) and "lk_alpha" in s["distil"] for s in (data, nested)
    )
    if cfg.distil.divergence != "lk" and not named:
        cfg.distil.lk_alpha = "token"  # the LK hybrid's α, unused by other divergences
    if not problems:
        _cross_checks(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def describe(cfg: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for documentation, from a config instance (default: JobConfig())."""
    cfg = JobConfig() if cfg is None else cfg
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows
