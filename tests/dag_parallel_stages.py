"""A stage module whose workers run as Ray tasks or Ray Train workers (tests/test_store.py): they
report the paths they read the stage's inputs from."""

import json
from pathlib import Path
from types import SimpleNamespace

from specdraft.pipeline.config import Resources
from specdraft.pipeline.engine.parallel import map_shards, train_data_parallel


def read_value(path: str):
    return json.loads(Path(path).read_text()), path


def placed(i: int):
    """A shard reporting where Ray placed it: (placement group id, GPU ids)."""
    import ray

    context = ray.get_runtime_context()
    return context.get_placement_group_id(), [int(g) for g in ray.get_gpu_ids()]


def threads(i: int) -> int:
    """A shard reporting the intra-op threads torch computes with."""
    import torch

    return torch.get_num_threads()


def _ddp_body(cfg, inputs, ctx):
    out = ctx.out
    upstream = sum(json.loads((p / "value.json").read_text()) for p in inputs.values())
    (out / "value.json").write_text(json.dumps(upstream + cfg.add))
    return {"weights_checksum": float(upstream), "read": [str(p) for p in inputs.values()]}


def run(cfg, inputs, ctx):
    out = ctx.out
    if cfg["kind"] == "shards":  # two shards, each reading every input
        paths = [(str(p / "value.json"),) for p in inputs.values()]
        results = map_shards(read_value, paths * 2, Resources(cpus=0.5, workers=2), ctx)
        (out / "value.json").write_text(json.dumps(sum(value for value, _ in results)))
        return {"read": [path for _, path in results]}
    ddp = SimpleNamespace(resources=Resources(cpus=0.5, workers=2), add=cfg["add"])
    return train_data_parallel(_ddp_body, ddp, inputs, ctx, stage="ddp")
