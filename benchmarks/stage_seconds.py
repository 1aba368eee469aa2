"""What a run's stages cost to make, cached or not: each stage's own run time from its artifact.

    python benchmarks/stage_seconds.py runs/compare-smollm2 [--json OUT]

A run that reused cached stages records 0 s for them in run.json's `seconds` (it did not run
them); the artifact's manifest keeps the seconds its maker took (its run time, not its wait in
Ray's queue). Summed, they are what the run costs from an empty store with stages one after
another, as they run on a 2-core machine (each asks for both cores). run.json carries them itself
(`made_seconds`, `made_seconds_total`) since 2026-12-02; for runs from before,
this script reads them from the store the run used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def stage_seconds(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    stages = {}
    for stage in run["stages"]:
        if "made_seconds" in stage:
            stages[stage["name"]] = round(stage["made_seconds"], 1)
            continue
        manifest = Path(stage["path"]) / "manifest.json"
        if not manifest.exists():
            raise SystemExit(f"{manifest} is missing: the store this run used is not here")
        stages[stage["name"]] = round(json.loads(manifest.read_text())["seconds"], 1)
    total = sum(stages.values())
    return {
        "run": run.get("command", ""),
        "stages": stages,
        "total_seconds": round(total, 1),
        "total_hours": round(total / 3600, 2),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (run.json inside)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (args.run_dir / "run.json").exists():
        parser.error(f"{args.run_dir}: no run.json (not a run directory)")
    result = stage_seconds(args.run_dir)
    for name, seconds in result["stages"].items():
        print(f"{name:<32} {seconds:>8.1f} s")
    print(f"{'total':<32} {result['total_seconds']:>8.1f} s ({result['total_hours']} h)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
