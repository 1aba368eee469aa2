"""Data parallelism inside a stage: shards of whole batches on `workers` Ray tasks, or DDP training
on `workers` Ray Train workers.

A stage that runs inside a Ray cluster (the executor's task) fans its shards out as Ray tasks with
the stage's per-worker resources (`resources.cpus`, `resources.gpus`: one GPU each, say) and gathers
the results in shard order. Outside Ray the shards run one after another in this process. Shards are
contiguous runs of whole batches and every batch is seeded by its position in the full list, so the
merged output is the same for any number of workers.

A training stage runs its whole body on every Ray Train worker (`train_data_parallel`): Trainer
splits each batch over the workers and all-reduces the gradients; rank 0 writes the artifact.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdraft.errors import InputError
from specdraft.pipeline.artifacts import checkpoint_dir


def shard_bounds(n: int, workers: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of at most `workers` contiguous shards of whole batches covering range(n)."""
    batches = math.ceil(n / batch_size)
    per_worker = math.ceil(batches / max(1, workers)) if batches else 0
    bounds = []
    for w in range(workers):
        start, end = w * per_worker * batch_size, min(n, (w + 1) * per_worker * batch_size)
        if start < end:
            bounds.append((start, end))
    return bounds


def in_ray_cluster() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def map_shards(
    fn: Callable[..., Any], shards: list[tuple], *, cpus: float, gpus: float
) -> list[Any]:
    """`fn(*shard)` for every shard, in shard order: Ray tasks with `cpus`/`gpus` each when this
    process is part of a Ray cluster and there is more than one shard, else here."""
    if len(shards) > 1 and in_ray_cluster():
        import ray

        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(fn)
        return ray.get([remote.remote(*shard) for shard in shards])
    return [fn(*shard) for shard in shards]


def worker_gpu_ids() -> list[int]:
    """The GPUs Ray gave this worker ([] outside Ray or without GPUs)."""
    if not in_ray_cluster():
        return []
    import ray

    return [int(i) for i in ray.get_gpu_ids()]


def train_data_parallel(
    train_fn: Callable[..., dict], cfg, inputs: dict[str, Path], out: Path, *, seed: int, stage: str
) -> dict:
    """`train_fn(cfg, inputs, out, seed=seed)` here with one worker; with `cfg.resources.workers`
    > 1, DDP on that many Ray Train workers (TorchTrainer), each with the stage's cpus and gpus.

    Every rank runs `train_fn`; rank 0 writes into `out`, the others into scratch directories.
    The info rank 0 returns gains `workers` and `replicas_in_sync` (whether the ranks' weights
    checksums, from `replica_checksum`, agree)."""
    if cfg.resources.workers == 1:
        return train_fn(cfg, inputs, out, seed=seed)
    if not in_ray_cluster():
        raise InputError(
            f"{stage}.resources.workers > 1 trains with Ray Train: run through Ray (drop --no-ray)"
        )
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": cfg.resources.cpus}
    if cfg.resources.gpus:
        per_worker["GPU"] = cfg.resources.gpus
    with tempfile.TemporaryDirectory(prefix="specdraft-train-") as storage:
        trainer = TorchTrainer(
            _ddp_worker,
            train_loop_config={
                "train_fn": train_fn,
                "cfg": cfg,
                "inputs": {k: str(v) for k, v in inputs.items()},
                "out": str(out),
                "seed": seed,
                "checkpoints": str(checkpoint_dir.get()) if checkpoint_dir.get() else None,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.resources.workers,
                use_gpu=cfg.resources.gpus > 0,
                resources_per_worker=per_worker,
            ),
            run_config=RunConfig(storage_path=storage, name=stage),
        )
        trainer.fit()  # raises the workers' error
    info_file = out / "ddp_info.json"
    info = json.loads(info_file.read_text())
    info_file.unlink()
    return info


def _ddp_worker(config: dict) -> None:
    """One Ray Train worker: the whole stage, writing only on rank 0."""
    import torch.distributed as dist

    if config["checkpoints"]:
        checkpoint_dir.set(Path(config["checkpoints"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = {k: Path(v) for k, v in config["inputs"].items()}
    with tempfile.TemporaryDirectory(prefix=f"specdraft-rank{rank}-") as scratch:
        out = Path(config["out"]) if rank == 0 else Path(scratch)
        info = config["train_fn"](config["cfg"], inputs, out, seed=config["seed"])
        checksums: list = [None] * world
        dist.all_gather_object(checksums, info.pop("weights_checksum"))
        if rank == 0:  # all-reduced gradients keep every replica's weights identical
            info = {**info, "workers": world, "replicas_in_sync": len(set(checksums)) == 1}
            (out / "ddp_info.json").write_text(json.dumps(info))
        dist.barrier()


def replica_checksum(model) -> dict:
    """`{"weights_checksum": Σ weights}` on a DDP worker, for `train_data_parallel` to compare
    across replicas (and drop); {} in a one-worker run, whose manifest has no such key."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    return {"weights_checksum": float(sum(p.double().sum() for p in model.parameters()))}
