"""Tiny stage modules for the DAG tests: each appends to a call log so tests can count runs."""

import json
import os
import signal
import time
from pathlib import Path


def _log(cfg: dict) -> None:
    """Ray workers started before a test do not see its environment: `cfg["log"]` reaches them."""
    with open(cfg.get("log") or os.environ["DAG_TEST_LOG"], "a") as f:
        f.write(cfg["name"] + "\n")


def run(cfg, inputs, ctx):
    out = ctx.out
    _log(cfg)
    if cfg.get("kill_once") and not Path(cfg["kill_once"]).exists():  # the worker dies mid-stage
        Path(cfg["kill_once"]).write_text(str(os.getpid()))
        (out / "partial.txt").write_text("half-written")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(cfg.get("sleep", 0))
    if cfg.get("stall_first") and not Path(cfg["stall_first"]).exists():  # the first maker stalls
        Path(cfg["stall_first"]).write_text(str(os.getpid()))
        while Path(cfg["stall_first"]).read_text() != "go on":
            time.sleep(0.02)
    while cfg.get("hold") and Path(cfg["hold"]).exists():  # stays busy while the file is there
        time.sleep(0.05)
    if cfg.get("barrier"):  # waits until `together` stages have reached this point
        folder, deadline = Path(cfg["barrier"]), time.time() + 90
        (folder / cfg["name"]).touch()
        while len(list(folder.iterdir())) < cfg["together"]:
            if time.time() > deadline:
                raise RuntimeError("the other stages never ran alongside this one")
            time.sleep(0.05)
    upstream = sum(json.loads((p / "value.json").read_text()) for p in inputs.values())
    if cfg.get("checkpointed"):  # fails on its first attempt, after leaving a checkpoint
        ckpt = ctx.checkpoints
        attempts = int((ckpt / "attempts").read_text()) if (ckpt / "attempts").exists() else 0
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "attempts").write_text(str(attempts + 1))
        if attempts == 0:
            raise RuntimeError("first attempt dies")
        cfg = {**cfg, "add": cfg["add"] + attempts}
    if cfg.get("fail"):
        (out / "partial.txt").write_text("half-written")
        raise RuntimeError("planned failure")
    (out / "value.json").write_text(json.dumps(upstream + cfg["add"]))
    if cfg.get("report_trust"):  # what the executor let this stage trust
        trust = {"target": ctx.trust.target, "draft": ctx.trust.draft}
        return {"value": upstream + cfg["add"], "trust_remote_code": trust}
    return {"value": upstream + cfg["add"]}
