"""Data parallelism inside a stage: shards of whole batches on `workers` Ray tasks.

A stage that runs inside a Ray cluster (the executor's task) fans its shards out as Ray tasks with
the stage's per-worker resources (`resources.cpus`, `resources.gpus`: one GPU each, say) and gathers
the results in shard order. Outside Ray the shards run one after another in this process. Shards are
contiguous runs of whole batches and every batch is seeded by its position in the full list, so the
merged output is the same for any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


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
