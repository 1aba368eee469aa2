"""The engine side of `specdraft serve-check`: runs inside vLLM's own environment, never imports
specdraft, and speaks JSON through two files.

    python vllm_worker.py REQUEST.json RESPONSE.json

REQUEST: {"target": dir, "draft": dir or null, "gamma": int, "prompts": [[token id, ...], ...],
          "max_new_tokens": int, "stop_token_ids": [int], "temperatures": [float], "seed": int,
          "dtype": str, "max_model_len": int, "memory_fraction": float}
RESPONSE: {"engine": "vllm", "version": str, "runs": [{"temperature": float, "outputs": [[ids]],
           "seconds": float, "generated_tokens": int, "num_drafts": int, "num_draft_tokens": int,
           "num_accepted_tokens": int, "accepted_per_pos": [int]}]}
          or {"error": str} (exit code 3) when the engine refuses the models.

Sampling is exactly softmax(logits / T): the checkpoints' generation_config is ignored
(`generation_config="vllm"`), no top-k/top-p/penalties; T = 0 is greedy. Prompts go in as token
ids, outputs come back as token ids (no detokenisation), generation stops after `max_new_tokens`
or at a stop id (included in the output, as specdraft's decoder does).
"""

from __future__ import annotations

import json
import sys
import time


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
        }
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
        **kwargs,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    runs = []
    for temperature in req["temperatures"]:
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
    return {"engine": "vllm", "version": vllm.__version__, "runs": runs}


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
