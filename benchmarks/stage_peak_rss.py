"""Peak resident memory of each pipeline stage while a specdraft command runs.

    python benchmarks/stage_peak_rss.py -- specdraft run jobs/smollm2.yaml store=/tmp/s

Runs the command and samples, every `--every` seconds, the RSS of the Ray worker processes that
run stages (named `ray::specdraft:<stage>` by the DAG runner); prints each stage's peak. A stage
shorter than the interval can be missed, and a spike between samples is not seen.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

PREFIX = "ray::specdraft:"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    peak: dict[str, int] = {}
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        for p in psutil.process_iter(["name", "memory_info"]):
            name = p.info["name"] or ""
            if name.startswith(PREFIX) and p.info["memory_info"] is not None:
                stage = name[len(PREFIX) :]
                peak[stage] = max(peak.get(stage, 0), p.info["memory_info"].rss)
        time.sleep(args.every)
    for stage, rss in sorted(peak.items()):
        print(f"{stage:<32} {rss / 2**30:.2f} GiB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
