"""What vLLM charges for a draft of each shape, for a large-vocabulary target (issue 30).

    python benchmarks/bench_draft_shapes.py RUN_DIR [--shapes 1x32768 2x32768 3x32768 ...]

RUN_DIR is a `specdraft run` of a job whose draft is cut from the target's layers with a trimmed
vocabulary (jobs/gemma3.yaml). Each shape `LxK` is the target's first L layers with its vocabulary
trimmed to the K ids most frequent in the run's generate-stage responses, chosen as the vocab_trim
stage chooses them, untrained. vLLM (serve-check's engine environment) serves the run's target
alone and with each draft through `use_heterogeneous_vocab` at T = 0, γ (default 3), one request
in flight, `--repeats` times over the run's serve-check prompts (median).

An untrained draft is seldom accepted, so its served numbers price the draft itself: the engine's
c = (L / speedup − 1) / γ, with L the acceptance length the engine reports (tokens/s = L /
(t_target (1 + γ c))). From c follow the acceptance length a draft of that shape must reach to pay
at all (γ c + 1) and to serve 1.3× (1.3 (γ c + 1)), and with the acceptance the run's own draft
measured (`--trained-length`, e.g. serving.json's served length at that γ), the speedup a draft of
that shape would serve were it as good. Acceptance depends on the shape too (fewer layers, less
agreement): compare shapes' required lengths with what training reaches for them.

Results go to benchmarks/results/draft_shapes_<date>.json with the machine described. Nothing
else may run meanwhile: the numbers are timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from specdraft.pipeline.engine.artifacts import atomic_write_text
from specdraft.pipeline.engine.machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = ["1x32768", "2x32768", "3x32768", "4x32768", "2x4096", "3x4096"]


def parse_shape(text: str) -> tuple[int, int]:
    layers, _, keep = text.partition("x")
    if not (layers.isdigit() and keep.isdigit()) or int(layers) < 1 or int(keep) < 2:
        raise SystemExit(f"--shapes: {text!r} is not LAYERSxKEPT_IDS (e.g. 3x32768)")
    return int(layers), int(keep)


def build_drafts(run_dir: Path, shapes: list[str], where: Path) -> tuple[object, Path, dict]:
    """The run's serve-check prompts and target, and one untrained trimmed draft per shape
    written under `where`: {shape: (directory, parameters)}."""
    from specdraft.drafts.models import first_layers_model, load_causal_lm, load_tokenizer
    from specdraft.drafts.vocab_trim import (
        count_tokens,
        most_frequent_ids,
        special_token_ids,
        write_trimmed_draft,
    )
    from specdraft.pipeline.commands.serve_check import _artifact, run_prompts
    from specdraft.pipeline.engine.rundir import read_run, read_run_job, run_store
    from specdraft.pipeline.sequences import load_sequences

    run = read_run(run_dir)
    store = run_store(read_run_job(run_dir))
    prompts, target, _ = run_prompts(run_dir, run, None, store=store)
    tokenizer = load_tokenizer(str(target))
    model = load_causal_lm(str(target))
    rows = model.config.get_text_config().vocab_size
    sequences = load_sequences(_artifact(run, "generate", store))
    response, prompt = count_tokens(sequences.select_columns(["input_ids", "response_mask"]), rows)
    specials = special_token_ids(tokenizer)
    drafts = {}
    for shape in shapes:
        layers, keep = parse_shape(shape)
        keep -= getattr(tokenizer, "unk_token_id", None) is None  # an added unk takes one row
        kept = most_frequent_ids(
            response[: len(tokenizer)], prompt[: len(tokenizer)], keep, specials
        )
        info = write_trimmed_draft(
            first_layers_model(model, layers), tokenizer, kept, where / shape
        )
        coverage = float(response[kept].sum()) / max(1, int(response.sum()))
        drafts[shape] = {
            "dir": where / shape,
            "layers": layers,
            "kept_ids": len(kept),
            "parameters": info["parameters"],
            "response_coverage": round(coverage, 4),
        }
    return prompts, target, drafts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--trained-length",
        type=float,
        default=None,
        help="the acceptance length the run's own draft served at --gamma (serving.json)",
    )
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=None, help="result file")
    args = parser.parse_args()
    for shape in args.shapes:
        parse_shape(shape)
    from specdraft.pipeline.commands.serve_check import SpeedPlan, engine_side, speed_points

    machine = describe_machine()
    plan = SpeedPlan(gammas=[args.gamma], concurrency=[1], repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="specdraft-shapes-") as tmp:
        prompts, target, drafts = build_drafts(args.run_dir, args.shapes, Path(tmp))
        prompts.rows = prompts.rows[: args.prompts]
        prompts = dataclasses.replace(prompts, gamma=args.gamma)
        alone = engine_side(target, None, prompts, [], speed=plan)["speed"]
        results = {}
        for shape, draft in drafts.items():
            served = engine_side(target, draft["dir"], prompts, [], speed=plan)["speed"]
            point = speed_points({args.gamma: served}, alone, {}, None, args.repeats)[0]
            c = point["engine_cost_ratio"]
            entry = {k: v for k, v in draft.items() if k != "dir"}
            entry.update(
                {
                    "target_only_tokens_per_second": point["target_only_tokens_per_second"],
                    "tokens_per_second": point["tokens_per_second"],
                    "speedup_untrained": point["speedup"],
                    "acceptance_length_untrained": point["acceptance_length"],
                    "engine_cost_ratio": c,
                    "break_even_acceptance_length": args.gamma * c + 1 if c is not None else None,
                    "acceptance_length_for_1.3x": 1.3 * (args.gamma * c + 1)
                    if c is not None
                    else None,
                    "speedup_at_trained_length": args.trained_length / (args.gamma * c + 1)
                    if c is not None and args.trained_length
                    else None,
                }
            )
            results[shape] = entry
            print(
                f"{shape:>9}: {entry['parameters'] / 1e6:6.1f} M parameters, c = {c:.3f}, "
                f"pays from L = {entry['break_even_acceptance_length']:.2f}, "
                f"1.3x from L = {entry['acceptance_length_for_1.3x']:.2f}",
                file=sys.stderr,
            )
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"draft_shapes_{date}.json"
    result = {
        "what": "vLLM's cost per target step (c) of untrained trimmed layer-cut drafts of the "
        "run's target, one request in flight, T = 0; the acceptance length each shape needs",
        "command": f"python benchmarks/bench_draft_shapes.py {args.run_dir} --shapes "
        f"{' '.join(args.shapes)} --gamma {args.gamma} --prompts {args.prompts} --repeats "
        f"{args.repeats}"
        + (f" --trained-length {args.trained_length}" if args.trained_length else ""),
        "target": str(target),
        "gamma": args.gamma,
        "prompts": len(prompts.rows),
        "max_new_tokens": prompts.max_new_tokens,
        "machine": machine,
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "shapes": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")  # a killed run leaves no half
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
