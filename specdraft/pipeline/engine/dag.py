"""The stage DAG, its content-addressed cache and its executor (in-process or Ray tasks).

A stage's artifact directory is named by a hash of its config, its inputs' hashes and the code
version. A stage writes into a temporary directory; `manifest.json` is written last and the directory
is committed by rename (or, in an object store, uploaded last: see store.py), so an artifact with a
manifest is complete and is never run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdraft.drafts.pair import UNTRUSTED, ModelTrust
from specdraft.pipeline.config import Resources
from specdraft.pipeline.engine.artifacts import (
    MANIFEST,
    StageContext,
    atomic_write_text,
    file_records,
    read_manifest,
)
from specdraft.pipeline.engine.code_version import code_version
from specdraft.pipeline.engine.environment import check_environment, check_ray_address
from specdraft.pipeline.engine.lock import LockLost, StageLock, StoreLocks, describe_holder
from specdraft.pipeline.engine.parallel import use_cpus
from specdraft.pipeline.engine.store import RemoteCheckpoints, Store, as_store


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # importable module with `run(cfg, inputs, ctx: StageContext) -> dict`
    config: Any  # a config dataclass (hashed as JSON)
    deps: tuple[str, ...] = ()  # stage names, or "key=stage" to pass a stage under another key
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    # What the stage reads besides its inputs and config, by content: a fingerprint of a local
    # model directory or data file, or a hub id's resolved revision (job.input_fingerprints).
    # Part of the key, so overwriting a model in place re-runs the stages that read it.
    fingerprint: str = ""


def dep_name(dep: str) -> str:
    """The stage a dependency entry names ("generate" or "draft_init=distil" -> "distil")."""
    return dep.partition("=")[2] or dep


def dep_key(dep: str) -> str:
    """The key the stage sees the dependency under ("draft_init=distil" -> "draft_init")."""
    return dep.partition("=")[0]


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    reused: bool
    seconds: float  # the stage's own run time (0 when reused)
    manifest: dict
    queued: float = 0.0  # seconds between its submission and its start, roughly (Ray runs)


class StageError(RuntimeError):
    """A stage failed; the message names the stage and the cause (kept in `cause`)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def stage_key(stage: Stage, dep_keys: dict[str, str]) -> str:
    payload = {
        "name": stage.name,
        "module": stage.module,
        "config": dataclasses.asdict(stage.config)
        if dataclasses.is_dataclass(stage.config)
        else stage.config,
        "seed": stage.seed,
        "deps": {d: dep_keys[dep_name(d)] for d in stage.deps},
        "code": code_version(stage.module),
    }
    if stage.fingerprint:  # only when set: keys of stages that read nothing local stay as they were
        payload["fingerprint"] = stage.fingerprint
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def topological(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    order, seen, visiting = [], set(), set()

    def visit(s: Stage):
        if s.name in seen:
            return
        if s.name in visiting:
            raise ValueError(f"stage cycle through {s.name}")
        visiting.add(s.name)
        for d in map(dep_name, s.deps):
            if d not in by_name:
                raise ValueError(f"stage {s.name} depends on unknown stage {d}")
            visit(by_name[d])
        visiting.discard(s.name)
        seen.add(s.name)
        order.append(s)

    for s in stages:
        visit(s)
    return order


def run_stage(
    module: str,
    config: Any,
    inputs: dict[str, str],
    store: Store,
    name: str,
    seed: int,
    meta: dict,
    *,
    trust: ModelTrust = UNTRUSTED,
    fence: StageLock | None = None,
    replace: bool = False,
    cpus: float = 0,
) -> dict:
    """Run one stage into a temporary directory and publish it as artifact `name` of `store`; the
    inputs are artifact names, fetched to this machine first. Runs in a Ray task or here.

    `fence` is the run's lock on the stage: checked right before publication, so a run whose lock
    was taken over discards its result (LockLost). Without `replace` (a forced re-run) an artifact
    that exists is never replaced: its maker's result stands (LockLost too). `cpus`: what the
    stage's Ray task holds, torch's threads (0: leave them)."""
    if cpus:
        use_cpus(cpus)
    local_inputs = {key: store.fetch(artifact) for key, artifact in inputs.items()}
    tmp = store.scratch(name)
    ctx = StageContext(
        out=tmp,
        seed=seed,
        checkpoints=store.local / f".ckpt-{name}",  # a retry resumes (elsewhere: from the store)
        checkpoint_mirror=RemoteCheckpoints(store, name) if store.remote else None,
        store=store,
        input_names=tuple(inputs.values()),
        trust=trust,
    )
    start = time.time()
    try:
        run = importlib.import_module(module).run
        info = run(config, local_inputs, ctx) or {}
        manifest = {
            **meta,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
            "inputs": {key: store.location(artifact) for key, artifact in inputs.items()},
            "seconds": round(time.time() - start, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "info": info,
            "files": file_records(tmp),  # what reuse checks the artifact against
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
        if fence is not None:
            fence.check()
        if store.publish(tmp, name, replace=replace) is None:
            raise LockLost(f"{store.location(name)} was published by another run meanwhile")
        shutil.rmtree(ctx.checkpoints, ignore_errors=True)
        if ctx.checkpoint_mirror is not None:
            ctx.checkpoint_mirror.clear()
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints stay: the next attempt resumes
        raise


def plan(stages: list[Stage], store: Store | Path) -> list[tuple[Stage, str, Path]]:
    """Every stage in dependency order with its key and its artifact's path on this machine."""
    store = as_store(store)
    keys: dict[str, str] = {}
    planned = []
    for s in topological(stages):
        keys[s.name] = stage_key(s, keys)
        planned.append((s, keys[s.name], store.path(f"{s.name}-{keys[s.name]}")))
    return planned


def dependents(stages: list[Stage], roots: set[str]) -> set[str]:
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for s in stages:
            if s.name not in out and any(dep_name(d) in out for d in s.deps):
                out.add(s.name)
                changed = True
    return out


def _say(msg: str) -> None:
    print(f"[specdraft] {msg}", file=sys.stderr, flush=True)


def execute(
    stages: list[Stage],
    store: Store | Path | str,
    *,
    force: set[str] = frozenset(),
    use_ray: bool = True,
    ray_address: str = "",
    say: Callable[[str], None] = _say,
    trust: ModelTrust = UNTRUSTED,
) -> dict[str, StageResult]:
    """Run what is not cached, in dependency order; return every stage's result (its artifact on
    this machine: with a remote store, fetched into the mirror). Stages may run model code shipped
    in a checkpoint only where `trust` allows it for that model (the job's per-model settings,
    given to each StageContext).
    A cached artifact is checked first (store.committed_path): a damaged one is made again.
    The environment is checked before anything (environment.check_environment), and what killed
    runs left in the store is removed (upkeep.clean_store)."""
    from specdraft.pipeline.engine.upkeep import clean_store

    check_environment()
    store = as_store(store)
    store.local.mkdir(parents=True, exist_ok=True)
    clean_store(store, say)
    unknown = set(force) - {s.name for s in stages}
    if unknown:
        raise StageError(f"--force names unknown stages: {', '.join(sorted(unknown))}")
    rerun = dependents(stages, set(force))
    planned = plan(stages, store)
    results: dict[str, StageResult] = {}
    todo = []
    for stage, key, path in planned:
        made = None if stage.name in rerun else store.committed_path(path.name)
        if made is not None:
            results[stage.name] = StageResult(stage.name, key, made, True, 0.0, read_manifest(made))
            say(f"{stage.name:<10} reused   {path}")
        else:
            todo.append((stage, key, path))
    if not todo:
        return results

    runner = _RayRunner(ray_address, todo) if use_ray else None
    locks = StoreLocks(store)
    try:
        _run_todo(todo, results, store, runner, locks, set(rerun), say, trust)
    finally:
        locks.release_all()
    return results


POLL_SECONDS = 2.0  # how often a stage locked by another run is looked at again


def _run_todo(
    todo, results, store: Store, runner, locks: StoreLocks, rerun: set[str], say, trust: ModelTrust
) -> None:
    """Run `todo` in dependency order: each stage under its store lock, or reused when another run
    sharing the store made it meanwhile (unless this run was asked to re-run it). A stage whose
    lock was taken over while it ran (LockLost) goes back to waiting, and then reuses what the
    other run made."""
    pending = list(todo)
    in_flight: dict[Any, tuple[Stage, str, Path, float]] = {}
    waiting: set[str] = set()
    while pending or in_flight:
        ready = [t for t in pending if all(dep_name(d) in results for d in t[0].deps)]
        for stage, key, path in ready:
            if not locks.acquire(path):
                if stage.name not in waiting:
                    holder = describe_holder(locks.holder(path))
                    say(f"{stage.name:<10} waiting  (another run is making it: {holder})")
                    waiting.add(stage.name)
                continue
            pending.remove((stage, key, path))
            waiting.discard(stage.name)
            made = None if stage.name in rerun else store.committed_path(path.name)
            if made is not None:
                locks.release(path)  # the other run finished it: reuse
                results[stage.name] = StageResult(
                    stage.name, key, made, True, 0.0, read_manifest(made)
                )
                say(f"{stage.name:<10} reused   {path} (made by another run)")
                continue
            inputs = {dep_key(d): results[dep_name(d)].path.name for d in stage.deps}
            meta = {"stage": stage.name, "key": key, "code_version": code_version(stage.module)}
            verb = "started  " if runner is None else "submitted"
            say(
                f"{stage.name:<10} {verb} (cpus={stage.resources.cpus:g}, gpus={stage.resources.gpus:g})"
            )
            start = time.time()
            options = {
                "trust": trust,
                "fence": locks.held_lock(path),
                "replace": stage.name in rerun,
            }
            if runner is None:
                try:
                    manifest = run_stage(
                        stage.module,
                        stage.config,
                        inputs,
                        store,
                        path.name,
                        stage.seed,
                        meta,
                        **options,
                    )
                except LockLost as lost:
                    _lost(stage, key, path, lost, pending, rerun, say)
                    continue
                except Exception as err:
                    raise StageError(
                        f"stage {stage.name} failed: {type(err).__name__}: {err}", err
                    ) from err
                finally:
                    locks.release(path)
                results[stage.name] = _finish(stage, key, path, start, manifest, say)
            else:
                ref = runner.submit(stage, inputs, store, path, meta, options)
                in_flight[ref] = (stage, key, path, start)
        if runner is not None and in_flight:
            done = runner.wait_one(list(in_flight), timeout=POLL_SECONDS if waiting else None)
            if done is None:
                continue
            ref, manifest_or_error = done
            stage, key, path, start = in_flight.pop(ref)
            locks.release(path)
            if isinstance(getattr(manifest_or_error, "cause", None), LockLost):
                _lost(stage, key, path, manifest_or_error.cause, pending, rerun, say)
                continue
            if isinstance(manifest_or_error, BaseException):
                runner.cancel(list(in_flight))
                err = manifest_or_error
                raise StageError(f"stage {stage.name} failed: {err}", err.cause) from None
            store.fetch(path.name)  # made on another machine, perhaps
            results[stage.name] = _finish(stage, key, path, start, manifest_or_error, say)
        elif pending and waiting:
            time.sleep(POLL_SECONDS)
        elif pending and not ready:
            raise StageError("stage graph is stuck (a dependency never ran)")


def _lost(stage, key, path, lost: LockLost, pending: list, rerun: set[str], say) -> None:
    """A stage whose result was discarded (LockLost): back to waiting for the other run's
    artifact, which it then reuses (a forced re-run too: the other run's is as new)."""
    say(f"{stage.name:<10} discarded its result: {lost}; using the other run's artifact")
    rerun.discard(stage.name)
    pending.append((stage, key, path))


def _finish(stage, key, path, start, manifest, say) -> StageResult:
    """The stage's result with its own run time (its manifest's `seconds`) and, apart, the time it
    waited since it was submitted (a comparison submits every ready stage at once and Ray runs them
    as CPUs free up: the wait is not the stage's cost)."""
    elapsed = time.time() - start
    ran = float(manifest.get("seconds", elapsed))
    queued = max(elapsed - ran, 0.0)
    waited = f" after {queued:.0f}s queued" if queued >= 60 else ""
    say(f"{stage.name:<10} finished in {ran:.1f}s{waited} -> {path}")
    return StageResult(stage.name, key, path, False, ran, manifest, queued)


class _RayRunner:
    """Submits stages as Ray tasks with the resources they ask for."""

    def __init__(self, address: str, todo: list[tuple[Stage, str, Path]]):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            # No address: an instance of our own ("local"), never another user's `ray start`
            # cluster that Ray would otherwise attach to; RAY_ADDRESS still names one explicitly
            # (it is how a Ray job's driver, `specdraft submit`'s entrypoint, finds its cluster:
            # a private instance there could not fetch the job's working_dir package from the
            # cluster's GCS and every stage would fail to start). Ray 2.60 binds its gRPC ports on every
            # interface whatever node IP it is given (it turns 127.0.0.1 into the host's address),
            # so what keeps other hosts out is its token authentication, on by default for a new
            # instance (RAY_AUTH_MODE=token; docs/promises.md).
            source = "--address or ray.address" if address else "$RAY_ADDRESS"
            address = address or os.environ.get("RAY_ADDRESS", "")
            check_ray_address(address, source)  # Ray retries a dead address for minutes
            kwargs: dict[str, Any] = {
                "address": address or "local",
                "include_dashboard": False,
                "logging_level": "warning",
            }
            ray.init(**kwargs)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        check_cluster_resources([t[0] for t in todo], ray.cluster_resources(), nodes)
        self._remote = ray.remote(run_stage)

    def submit(
        self, stage: Stage, inputs: dict[str, str], store: Store, path: Path, meta: dict, options
    ):
        # A data-parallel stage's task only coordinates: its worker tasks hold the resources.
        parallel = getattr(stage.resources, "workers", 1) > 1
        if not parallel:  # torch computes with the CPUs the task holds (run_stage)
            options = {**options, "cpus": stage.resources.cpus}
        return self._remote.options(
            num_cpus=0 if parallel else stage.resources.cpus,
            num_gpus=0 if parallel else stage.resources.gpus,
            name=f"specdraft:{stage.name}",
            max_retries=2,
        ).remote(stage.module, stage.config, inputs, store, path.name, stage.seed, meta, **options)

    def wait_one(self, refs, timeout: float | None = None):
        """The first stage to end, (ref, manifest or StageError); None if none ended in `timeout`."""
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            return None
        ref = done[0]
        try:
            return ref, self.ray.get(ref)
        except Exception as err:  # a RayTaskError wraps the stage's own exception
            cause = getattr(err, "cause", None) or err
            return ref, StageError(f"{type(cause).__name__}: {cause}", cause)

    def cancel(self, refs) -> None:
        for ref in refs:
            self.ray.cancel(ref, force=True)


def check_cluster_resources(
    stages: list[Stage], available: dict[str, float], nodes: list[dict] | None = None
) -> None:
    """Fail at once when a stage asks for more than the cluster has (Ray would wait forever).
    Workers that must start together (DDP training, or a `placement` strategy) count together;
    `nodes` (each node's resources) checks what STRICT_PACK and STRICT_SPREAD need of single nodes."""
    problems = []
    for s in stages:
        r = s.resources
        workers, placement = getattr(r, "workers", 1), getattr(r, "placement", "")
        together = workers > 1 and (bool(placement) or hasattr(s.config, "train"))
        per_worker = {res: want for res, want in (("GPU", r.gpus), ("CPU", r.cpus)) if want}
        for res, per in per_worker.items():
            want = per * workers if together else per
            if want > available.get(res, 0.0):
                asks = f"{workers} workers x {per:g}" if together else f"{per:g}"
                problems.append(
                    f"stage {s.name} asks for {asks} {res} but the cluster has "
                    f"{available.get(res, 0.0):g}"
                )
        if nodes is None or workers == 1 or placement not in ("STRICT_PACK", "STRICT_SPREAD"):
            continue
        scale = workers if placement == "STRICT_PACK" else 1
        fit = [n for n in nodes if all(n.get(k, 0.0) >= v * scale for k, v in per_worker.items())]
        if placement == "STRICT_PACK" and not fit:
            problems.append(
                f"stage {s.name}: STRICT_PACK needs one node with {workers} x {per_worker}; "
                "no node has that much"
            )
        if placement == "STRICT_SPREAD" and len(fit) < workers:
            problems.append(
                f"stage {s.name}: STRICT_SPREAD needs {workers} nodes with {per_worker} each; "
                f"the cluster has {len(fit)}"
            )
    if problems:
        raise StageError(
            "the cluster cannot run this job:\n  - "
            + "\n  - ".join(problems)
            + "\n  lower the stage's resources (e.g. `distil.resources.gpus=0`) or attach to a "
            "cluster that has them (--address)"
        )
