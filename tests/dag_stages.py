"""Tiny stage modules for the DAG tests: each appends to a call log so tests can count runs."""

import json
import os
from pathlib import Path


def _log(out: Path, name: str) -> None:
    with open(os.environ["DAG_TEST_LOG"], "a") as f:
        f.write(name + "\n")


def run(cfg, inputs, out, *, seed):
    _log(out, cfg["name"])
    upstream = sum(json.loads((p / "value.json").read_text()) for p in inputs.values())
    if cfg.get("fail"):
        (out / "partial.txt").write_text("half-written")
        raise RuntimeError("planned failure")
    (out / "value.json").write_text(json.dumps(upstream + cfg["add"]))
    return {"value": upstream + cfg["add"]}
