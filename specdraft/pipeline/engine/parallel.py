"""Data parallelism inside a stage: shards of whole batches on `workers` Ray tasks, or DDP training
on `workers` Ray Train workers.

A stage that runs inside a Ray cluster (the executor's task) fans its shards out as Ray tasks with
the stage's per-worker resources (`resources.cpus`, `resources.gpus`: one GPU each, say) and gathers
the results in shard order. Outside Ray the shards run one after another in this process. Shards are
contiguous runs of whole batches and every batch is seeded by its position in the full list, so the
merged output is the same for any number of workers. With `resources.placement` set, the shard
tasks are first reserved together in a placement group (all start, or none waits half-placed).

A training stage runs its whole body on every Ray Train worker (`train_data_parallel`): Trainer
splits each batch over the workers and all-reduces the gradients; rank 0 writes the artifact.

With a store at a URL, workers may sit on machines that have not seen the stage's inputs: each
worker fetches them into its machine's mirror first, and a DDP rank 0 elsewhere hands its output
back through the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdraft.errors import InputError
from specdraft.pipeline.engine.artifacts import StageContext
from specdraft.pipeline.engine.environment import placement_timeout


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
    fn: Callable[..., Any], shards: list[tuple], resources, ctx: StageContext
) -> list[Any]:
    """`fn(*shard)` for every shard, in shard order: Ray tasks with the stage's per-worker
    `resources` (cpus, gpus; reserved together in a placement group when `resources.placement`
    names a strategy) when this process is part of a Ray cluster and there is more than one
    shard, else here. `ctx` (the running stage's) tells workers elsewhere what to fetch."""
    if len(shards) > 1 and in_ray_cluster():
        import ray

        cpus, gpus = resources.cpus, resources.gpus
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(_run_shard)
        context = worker_context(ctx)
        with placement_group(len(shards), cpus, gpus, resources.placement) as where:
            refs = [
                remote.options(name=fn.__name__, scheduling_strategy=where(i)).remote(
                    fn, context, cpus, *shard
                )
                for i, shard in enumerate(shards)
            ]
            return ray.get(refs)
    return [fn(*shard) for shard in shards]


@contextlib.contextmanager
def placement_group(n: int, cpus: float, gpus: float, strategy: str):
    """`where(i)`: the scheduling strategy of worker i, in bundle i of a placement group of `n`
    bundles reserved with `strategy` (removed on exit); without a strategy, Ray's default."""
    if not strategy:
        yield lambda i: None
        return
    import ray
    from ray.util.placement_group import placement_group as reserve
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
    group = reserve([bundle] * n, strategy=strategy)
    try:
        try:
            ray.get(group.ready(), timeout=placement_timeout())
        except ray.exceptions.GetTimeoutError:
            raise InputError(
                f"could not reserve {n} x {bundle} with strategy {strategy} in "
                f"{placement_timeout():g}s (SPECDRAFT_PLACEMENT_TIMEOUT): the cluster is busy or "
                "lacks the nodes for it"
            ) from None
        yield lambda i: PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=i
        )
    finally:
        remove_placement_group(group)


def use_cpus(cpus: float) -> None:
    """Torch computes with the `cpus` this Ray task holds (at least one thread).

    A Ray worker process runs task after task, and torch keeps the intra-op thread count it
    started with: the first task's CPUs (Ray's OMP_NUM_THREADS). After a 1-CPU task every later
    task in that worker computed on one core (the real pair's cold run: distil 389 s against
    221 s when its worker had started on a 2-CPU stage)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _run_shard(fn: Callable[..., Any], context: tuple | None, cpus: float, *shard) -> Any:
    use_cpus(cpus)
    return fn(*fetch_inputs(context, shard))


def worker_context(ctx: StageContext) -> tuple | None:
    """What a worker on another machine needs to find the running stage's inputs: (store, this
    machine's mirror, input artifact names); None with a local (shared) store."""
    if ctx.store is None or not ctx.store.remote:
        return None
    return ctx.store, str(ctx.store.local), list(ctx.input_names)


def fetch_inputs(context: tuple | None, args):
    """On a worker: the stage's inputs fetched into this machine's mirror, and `args` with the
    stage machine's mirror paths in it (str, Path, in lists, tuples, dicts) moved to this one's."""
    if context is None:
        return args
    store, there, names = context
    for name in names:
        store.fetch(name)
    return relocated(args, there, str(store.local))


def relocated(obj, old: str, new: str):
    """`obj` with every path under directory `old` moved under `new`."""
    if old == new:
        return obj
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if text == old or text.startswith(old + os.sep):
            return type(obj)(new + text[len(old) :])
        return obj
    if isinstance(obj, dict):
        return {k: relocated(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(relocated(v, old, new) for v in obj)
    return obj


def worker_gpu_ids() -> list[int]:
    """The GPUs Ray gave this worker ([] outside Ray or without GPUs)."""
    if not in_ray_cluster():
        return []
    import ray

    return [int(i) for i in ray.get_gpu_ids()]


def train_data_parallel(
    train_fn: Callable[..., dict], cfg, inputs: dict[str, Path], ctx: StageContext, *, stage: str
) -> dict:
    """`train_fn(cfg, inputs, ctx)` here with one worker; with `cfg.resources.workers` > 1, DDP on
    that many Ray Train workers (TorchTrainer), each with the stage's cpus and gpus.

    Every rank runs `train_fn`; rank 0 writes into `ctx.out`, the others (given a copy of `ctx`
    whose `out` is theirs) into scratch directories.
    The info rank 0 returns gains `workers` and `replicas_in_sync` (whether the ranks' weights
    checksums, from `replica_checksum`, agree)."""
    if cfg.resources.workers == 1:
        return train_fn(cfg, inputs, ctx)
    if not in_ray_cluster():
        raise InputError(
            f"{stage}.resources.workers > 1 trains with Ray Train: run through Ray (drop --no-ray)"
        )
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = ctx.out
    context = worker_context(ctx)
    staging = f".staging-{stage}-{uuid.uuid4().hex[:8]}" if context else None
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
                "ctx": ctx,
                "checkpoints": str(ctx.checkpoints) if ctx.checkpoints else None,
                "context": context,
                "staging": staging,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.resources.workers,
                use_gpu=cfg.resources.gpus > 0,
                resources_per_worker=per_worker,
                placement_strategy=cfg.resources.placement or "PACK",
            ),
            run_config=RunConfig(storage_path=storage, name=stage),
        )
        try:
            trainer.fit()  # raises the workers' error
            if staging:  # rank 0 may have run on another machine: its output comes via the store
                context[0].download(staging, out)
        finally:
            if staging:
                context[0].delete(staging)
    info_file = out / "ddp_info.json"
    info = json.loads(info_file.read_text())
    info_file.unlink()
    return info


def _ddp_worker(config: dict) -> None:
    """One Ray Train worker: the whole stage, writing only on rank 0."""
    import torch.distributed as dist

    paths, checkpoints = fetch_inputs(config["context"], (config["inputs"], config["checkpoints"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = {k: Path(v) for k, v in paths.items()}
    with tempfile.TemporaryDirectory(prefix=f"specdraft-rank{rank}-") as scratch:
        ctx = config["ctx"]
        out = ctx.out if rank == 0 and not config["staging"] else Path(scratch)
        checkpoints = Path(checkpoints) if checkpoints else None
        ctx = dataclasses.replace(ctx, out=out, checkpoints=checkpoints)
        info = config["train_fn"](config["cfg"], inputs, ctx)
        checksums: list = [None] * world
        dist.all_gather_object(checksums, info.pop("weights_checksum"))
        if rank == 0:  # all-reduced gradients keep every replica's weights identical
            info = {**info, "workers": world, "replicas_in_sync": len(set(checksums)) == 1}
            (out / "ddp_info.json").write_text(json.dumps(info))
            if config["staging"]:
                config["context"][0].upload(out, config["staging"])
        dist.barrier()


def replica_checksum(model) -> dict:
    """`{"weights_checksum": Σ weights}` on a DDP worker, for `train_data_parallel` to compare
    across replicas (and drop); {} in a one-worker run, whose manifest has no such key."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    return {"weights_checksum": float(sum(p.double().sum() for p in model.parameters()))}
