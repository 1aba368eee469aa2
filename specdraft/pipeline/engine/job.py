"""A job as a DAG of stages, and a run: execute the DAG and lay out the run directory."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from specdraft.drafts.pair import ModelTrust
from specdraft.errors import InputError
from specdraft.pipeline.config import (
    DraftConfig,
    JobConfig,
    Resources,
    TargetOutputsConfig,
    VocabTrimConfig,
)
from specdraft.pipeline.engine.artifacts import lineage_hash
from specdraft.pipeline.engine.dag import Stage, StageError, StageResult, execute
from specdraft.pipeline.engine.fingerprint import input_fingerprint
from specdraft.pipeline.engine.rundir import check_apart, check_destination, write_run_dir
from specdraft.pipeline.engine.store import Store, default_location
from specdraft.pipeline.preflight import check_inputs

# name: (job section, input stages). The one table of the DAG's wiring: `specdraft run` builds it
# whole (build_stages), `specdraft compare` takes its shared part and a chain per recipe
# (recipe_stages); both go through section_stage, so a stage is made the same way in each.
# `target_outputs` (the target's hidden states for generate's sequences, made once) has no section:
# its config is derived (target_outputs_stage); without distil.stored_target_outputs it is left
# out, and reference and distil run the target themselves. `vocab_trim` (draft.keep_vocab > 0)
# trims the draft init's vocabulary to the tokens frequent in generate's sequences; the stages
# after it read its draft under the name `draft_init` (draft_input). Its config is derived too.
STAGES = {
    "data": ("data", ()),
    "target": ("target", ("data",)),
    "draft_init": ("draft", ("data",)),
    # generate reads draft_init only with draft_fraction > 0 (section_stage drops it otherwise)
    "generate": ("generate", ("data", "target", "draft_init")),
    "target_outputs": ("distil", ("data", "target", "generate")),
    "vocab_trim": ("draft", ("target", "draft_init", "generate")),
    "reference": ("reference", ("data", "target", "draft_init", "generate", "target_outputs")),
    "distil": (
        "distil",
        ("data", "target", "draft_init", "reference", "generate", "target_outputs"),
    ),
    "evaluate": ("evaluate", ("data", "target", "draft_init", "reference", "distil")),
    "export": ("export", ("data", "target", "draft_init", "distil", "evaluate")),
    "report": ("report", ("target", "draft_init", "reference", "distil", "evaluate")),
}
# The drafts the evaluate stage judges, by the input names it reads them under (evaluate.DRAFTS).
EVALUATED = ("draft_init", "reference", "distil")


def draft_input(job: JobConfig) -> str:
    """The dependency entry under which the stages after generate read the draft init: the
    trimmed draft (`draft_init=vocab_trim`) when draft.keep_vocab is set."""
    return _alias("draft_init", "vocab_trim") if job.draft.keep_vocab else "draft_init"


def vocab_trim_stage(job: JobConfig) -> Stage:
    """The draft init trimmed to draft.keep_vocab rows, by frequency on generate's sequences."""
    config = VocabTrimConfig(keep_vocab=job.draft.keep_vocab)
    return section_stage(job, "vocab_trim", job.seed, config=config)


def final_distil(job: JobConfig) -> str:
    return "distil" if job.distil.rounds == 1 else f"distil_r{job.distil.rounds}"


def section_stage(
    job: JobConfig,
    name: str,
    seed: int,
    *,
    deps: tuple[str, ...] | None = None,
    config=None,
    suffix: str = "",
) -> Stage:
    """Stage `name` of STAGES, called `name<suffix>`: its module, its job section's config and
    resources, its inputs from the table unless `deps` rewires them, `config` in place of the
    section's (a later round's generation)."""
    section, table_deps = STAGES[name]
    config = getattr(job, section) if config is None else config
    deps = table_deps if deps is None else tuple(deps)
    if name == "generate" and not config.draft_fraction:
        # only the target writes (or the dataset gives) the sequences: the draft is not read, so
        # jobs and recipes that differ in their draft share the sequences and the target outputs
        deps = tuple(d for d in deps if d.split("=")[0] != "draft_init")
    return Stage(
        f"{name}{suffix}",
        f"specdraft.pipeline.stages.{name}",
        config,
        deps,
        getattr(config, "resources", Resources(cpus=1)),
        seed,
    )


def evaluate_deps(drafts: tuple[str, ...], last_distil: str = "distil") -> tuple[str, ...]:
    """The evaluate stage's inputs from STAGES, keeping of EVALUATED only `drafts`; `distil` is
    passed as the last round's (`distil=distil_rN`), the name the stage reads it by."""
    kept = [d for d in STAGES["evaluate"][1] if d not in EVALUATED or d in drafts]
    return tuple(_alias("distil", last_distil) if d == "distil" else d for d in kept)


def build_stages(job: JobConfig) -> list[Stage]:
    """The DAG: STAGES in order, with `distil` unrolled into its on-policy rounds. The stages that
    read a model or data from outside the store carry its content fingerprint in their key."""
    last = final_distil(job)
    fingerprints = input_fingerprints(job)
    stored = job.distil.stored_target_outputs
    stages = []
    for name, (_, deps) in STAGES.items():
        if name == "distil":
            stages.extend(distil_chain(job, job.seed)[0])
            continue
        if name == "vocab_trim":
            if job.draft.keep_vocab:
                stages.append(vocab_trim_stage(job))
            continue
        if name in ("reference", "evaluate", "export", "report"):
            deps = tuple(draft_input(job) if d == "draft_init" else d for d in deps)
        if name == "target_outputs":
            if stored:  # read by the reference and the first distil round
                readers = (job.reference.train, job.distil.train)
                stages.append(target_outputs_stage(job, job.seed, "generate", readers))
            continue
        if not stored:
            deps = tuple(d for d in deps if d != "target_outputs")
        if name in ("evaluate", "export", "report"):
            # the stages after distil read the last round's draft under the name `distil`
            deps = tuple(_alias("distil", last) if d == "distil" else d for d in deps)
        if name == "draft_init" and job.draft.from_target_layers:
            deps = ("data", "target")  # the draft is cut from the target's first layers
        config = None
        if name == "draft_init":
            # the draft init is the same for any K (trimming is vocab_trim's, keyed there) and
            # any intersection floor (the pair check's, made before any stage runs)
            config = dataclasses.replace(
                job.draft, keep_vocab=0, min_intersection=DraftConfig.min_intersection
            )
        stage = section_stage(job, name, job.seed, deps=deps, config=config)
        if name in ("target", "draft_init") and (
            stage.config.model != "builtin" or getattr(stage.config, "from_target_layers", 0)
        ):
            # a given model is only recorded (a GGUF converted), a layer draft cut: not trained
            stage = dataclasses.replace(stage, resources=Resources(cpus=1))
        if name == "report" and not stage.config.title:
            # the report names its job
            stage = dataclasses.replace(
                stage, config=dataclasses.replace(stage.config, title=job.name)
            )
        stages.append(dataclasses.replace(stage, fingerprint=fingerprints.get(name, "")))
    return stages


def _alias(name: str, stage: str) -> str:
    """A dependency entry: `stage`'s artifact passed under the input name `name` ("name=stage")."""
    return name if name == stage else f"{name}={stage}"


def target_outputs_name(generate: str) -> str:
    """The target_outputs stage of generate stage `generate`, named after it
    (`generate_r2.fkl.s0` -> `target_outputs_r2.fkl.s0`)."""
    return "target_outputs" + generate.removeprefix("generate")


def target_outputs_stage(
    job: JobConfig, seed: int, generate: str, readers, *, suffix: str | None = None
) -> Stage:
    """The target's outputs for `generate`'s sequences, stored once in target_outputs.format:
    the target forward in bf16 when every training section in `readers` (the TrainConfigs of the
    stages reading them) runs in bf16, on the device distil trains on. k and the temperature
    are keyed with format=topk only (the hidden states depend on neither), so jobs and recipes
    that differ only in them share a hidden-state store; nothing of the draft is keyed, so every
    draft shape, recipe and seed on one draft-free generation shares either store. Named after
    `generate` (target_outputs_name) unless `suffix` names it `target_outputs<suffix>`."""
    bf16 = all(train.precision == "bf16" for train in readers)
    res = job.distil.resources
    topk = job.target_outputs.format == "topk"
    config = TargetOutputsConfig(
        precision="bf16" if bf16 else "fp32",
        format=job.target_outputs.format,
        k=job.target_outputs.k if topk else 0,
        temperature=job.distil.temperature if topk else 0.0,
        resources=Resources(cpus=res.cpus, gpus=res.gpus, workers=job.target_outputs.workers),
    )
    return section_stage(
        job,
        "target_outputs",
        seed,
        deps=("data", "target", _alias("generate", generate)),
        config=config,
        suffix=generate.removeprefix("generate") if suffix is None else suffix,
    )


def _stored_input(job: JobConfig, generate: str) -> tuple[str, ...]:
    """The dependency entry on `generate`'s stored target outputs, when the job stores them."""
    if not job.distil.stored_target_outputs:
        return ()
    return (_alias("target_outputs", target_outputs_name(generate)),)


def distil_chain(
    job: JobConfig,
    seed: int,
    *,
    generate: str = "generate",
    suffix: str = "",
    stored: str | None = None,
) -> tuple[list[Stage], str]:
    """`distil<suffix>` on `generate`'s sequences, then on-policy rounds r = 2..R unrolled as
    `generate_r<r><suffix>` (the previous round's draft samples: with generate's shares, or all
    of them with distil.later_rounds=draft; with generate's shares and draft_fraction=0 the
    target writes every round, seeded apart, without the previous draft) and
    `distil_r<r><suffix>` (which starts from it), each cached on its own. Returns the stages and
    the last distil's name.

    Round inputs arrive under the names the generate and distil stages read: the previous round's
    draft as `draft_init` (`draft_init=distil_r<r-1>`: the draft a round samples with and starts
    from) and the round's sequences as `generate` (`generate=generate_r<r>`). The aliases are part
    of the cache keys (dag.stage_key hashes the entries), so they are kept rather than renamed.

    With distil.stored_target_outputs each round reads its sequences' stored target outputs as
    `target_outputs` (round 1 those of `generate`, made by whoever made it, or the stage
    `stored` when given; round r its own `target_outputs_r<r><suffix>`, in the chain)."""
    first_store = (
        (_alias("target_outputs", stored),)
        if stored and job.distil.stored_target_outputs
        else _stored_input(job, generate)
    )
    stages = [
        section_stage(
            job,
            "distil",
            seed,
            deps=(
                "data",
                "target",
                draft_input(job),
                "reference",
                _alias("generate", generate),
                *first_store,
            ),
            suffix=suffix,
        )
    ]
    previous = stages[0].name
    later = job.generate
    if job.distil.later_rounds == "draft":
        later = dataclasses.replace(job.generate, draft_fraction=1.0, dataset_fraction=0.0)
    for r in range(2, job.distil.rounds + 1):
        # rounds after the first are seeded apart from the first (seed + r - 1)
        sampled = section_stage(
            job,
            "generate",
            seed + r - 1,
            deps=("data", "target", _alias("draft_init", previous)),
            config=later,
            suffix=f"_r{r}{suffix}",
        )
        distilled = section_stage(
            job,
            "distil",
            seed + r - 1,
            deps=(
                "data",
                "target",
                _alias("draft_init", previous),
                "reference",
                _alias("generate", sampled.name),
                *_stored_input(job, sampled.name),
            ),
            suffix=f"_r{r}{suffix}",
        )
        stages.append(sampled)
        if job.distil.stored_target_outputs:
            stages.append(
                target_outputs_stage(job, seed + r - 1, sampled.name, (job.distil.train,))
            )
        stages.append(distilled)
        previous = distilled.name
    return stages, previous


def recipe_stages(
    job: JobConfig,
    seed: int,
    *,
    suffix: str,
    generate: str | None,
    eval_seed: int,
    stored: str | None = None,
) -> tuple[list[Stage], str, str]:
    """A comparison recipe's chain, every stage named with `suffix`: its own generation
    `generate<suffix>` (and its stored target outputs) when `generate` is None (else it trains on
    that stage's sequences and their target outputs, or those of the stage `stored` when given),
    its distil_chain, and `evaluate<suffix>` of its last draft alone, seeded `eval_seed` (every
    recipe is judged on the same prompts and continuations). Returns the stages, the
    generation's name and the evaluation's name."""
    stages = []
    if generate is None:
        stages.append(section_stage(job, "generate", seed, suffix=suffix))
        generate, stored = stages[0].name, None
        if job.distil.stored_target_outputs:
            stages.append(target_outputs_stage(job, seed, generate, (job.distil.train,)))
    chain, last = distil_chain(job, seed, generate=generate, suffix=suffix, stored=stored)
    stages += chain
    evaluate = section_stage(
        job, "evaluate", eval_seed, deps=evaluate_deps(("distil",), last), suffix=suffix
    )
    return [*stages, evaluate], generate, evaluate.name


def store_for(job: JobConfig) -> Store:
    return Store(job.store or default_location())


def check_store(job: JobConfig, *, create: bool) -> Store:
    """The job's store, checked before any stage runs: a local store must be (or become, when
    `create`) a writable directory. InputError naming where the location came from otherwise."""
    store = store_for(job)
    if store.remote:
        return store
    if job.store:
        name = f"store {store.local}"
    elif os.environ.get("SPECDRAFT_STORE"):
        name = f"$SPECDRAFT_STORE {store.local}"
    else:
        name = f"the default store {store.local}"
    existing = next(p for p in (store.local, *store.local.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{name}: {existing} is a file, not a directory")
    if not create:
        return store
    try:
        store.local.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=store.local, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{name}: not a writable directory ({err.strerror})") from None
    return store


def input_fingerprints(job: JobConfig) -> dict[str, str]:
    """{stage: fingerprint} of the local models and data (or hub revisions) the job's stages read
    (fingerprint.py): in the stages' keys, never in the config values the user sees."""
    return {
        "data": input_fingerprint(job.data.source, "dataset"),
        "target": input_fingerprint(job.target.model),
        "draft_init": input_fingerprint(job.draft.model),
    }


def resolve_local_paths(job: JobConfig) -> None:
    """Make local model and data paths absolute, so Ray workers and cache keys agree on them; a
    `pkg:<package>/<file>` model becomes the path of that file in the installed package (or, for
    a file the package ships in parts, of the file assembled once into `<store>/.packages/`)."""
    from specdraft.drafts.models import PACKAGE_PREFIX, package_file

    assembled = store_for(job).local / ".packages"
    for section, key in (("target", "model"), ("draft", "model"), ("data", "source")):
        cfg = getattr(job, section)
        value = getattr(cfg, key)
        if section != "data" and value.startswith(PACKAGE_PREFIX):
            setattr(cfg, key, package_file(value, assembled))
        elif value != "builtin" and Path(value).expanduser().exists():
            setattr(cfg, key, str(Path(value).expanduser().resolve()))


def job_trust(job: JobConfig) -> ModelTrust:
    """Whose model code the job's stages may run: each model's own trust_remote_code (a layer
    draft is the target's code, trusted as the target is)."""
    return ModelTrust.for_job(
        job.target.trust_remote_code, job.draft.trust_remote_code, job.draft.from_target_layers
    )


def read_places(job: JobConfig) -> dict[str, Path]:
    """What a run of `job` reads or writes on this machine besides its --out (after
    resolve_local_paths): the store (or a remote store's mirror), and the local models and data."""
    store = store_for(job)
    places = {"the store" if not store.remote else "the store's mirror": store.local}
    for what, value in (
        ("the data", job.data.source),
        ("the target model", job.target.model),
        ("the draft model", job.draft.model),
    ):
        if value != "builtin" and Path(value).is_absolute() and Path(value).exists():
            places[what] = Path(value)
    return places


def check_models(job: JobConfig) -> None:
    """The pair check, before anything trains: a mismatch (a tokenizer that differs without
    draft.vocabulary=intersection, an intersection below draft.min_intersection) raises PairError
    saying what differs, a draft.keep_vocab the target's vocabulary cannot hold an InputError.
    Model code runs per model (job_trust): trusting the target never runs the draft's."""
    if job.target.model == "builtin":
        return  # the toy pair shares the data stage's tokenizer by construction
    from specdraft.drafts.pair import check_layer_draft, require_pair

    trust = job_trust(job)
    if job.draft.keep_vocab:  # a trimmed draft is valid for its target: its rows must fit
        from specdraft.drafts.models import load_tokenizer
        from specdraft.drafts.vocab_trim import check_keep_vocab

        tokenizer = load_tokenizer(job.target.model, trust_remote_code=trust.target)
        check_keep_vocab(job.draft.keep_vocab, tokenizer)
    if job.draft.from_target_layers:  # the draft shares the target's tokenizer by construction
        check_layer_draft(
            job.target.model, job.draft.from_target_layers, trust_remote_code=trust.target
        )
        return
    require_pair(
        job.target.model,
        job.draft.model,
        context_length=job.data.max_length,
        trust_remote_code=trust,
        vocabulary=job.draft.vocabulary,
        min_intersection=job.draft.min_intersection,
    )


class RunLog:
    """Stage events to stderr and appended to `<store>/logs/<job>.log`."""

    def __init__(self, store: Path, job: str):
        self.path = store / "logs" / f"{job}.log"

    def __call__(self, message: str) -> None:
        print(f"[specdraft] {message}", file=sys.stderr, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def execute_logged(
    stages: list[Stage], job: JobConfig, *, force: set[str], use_ray: bool | None
) -> dict[str, StageResult]:
    """Execute `stages` in the job's store and Ray setting, logging to `<store>/logs/<job>.log`."""
    store = store_for(job)
    log = RunLog(store.local, job.name)
    try:
        return execute(
            stages,
            store,
            force=set(force),
            use_ray=job.ray.enabled if use_ray is None else use_ray,
            ray_address=job.ray.address,
            say=log,
            # the job's own settings, per model: what an artifact's manifest says is never trusted
            trust=job_trust(job),
        )
    except StageError as err:
        log(f"FAILED: {err}")
        raise


def run_job(
    job: JobConfig,
    out: Path,
    *,
    force: set[str] = frozenset(),
    use_ray: bool | None = None,
    overwrite: bool = False,
    command: str = "",
) -> dict[str, StageResult]:
    """Execute the job's DAG (cached stages are reused) and publish the run directory `out` whole
    (rundir.write_run_dir). `out` (apart from what the run reads), the store and the models are
    checked before any stage runs."""
    started = time.time()
    out = Path(out).expanduser().absolute()
    check_destination(out, overwrite=overwrite)
    resolve_local_paths(job)
    check_apart(out, read_places(job))  # before the store is made: it may be inside `out`
    check_store(job, create=True)
    check_models(job)
    check_inputs(job)
    results = execute_logged(build_stages(job), job, force=force, use_ray=use_ray)
    metrics = json.loads((results["evaluate"].path / "metrics.json").read_text())
    export_inputs = [Path(p) for p in results["export"].manifest["inputs"].values()]
    metrics = {
        "job": job.name,
        "job_hash": lineage_hash(export_inputs),
        **metrics,
        "draft": str((out / "draft").resolve()),
    }
    write_run_dir(
        out,
        kind="run",
        job=dataclasses.asdict(job),
        results=results,
        copies={
            "draft": results["export"].path / "draft",
            "report": results["report"].path / "report",
        },
        texts={"metrics.json": json.dumps(metrics, indent=2)},
        command=command,
        started=started,
        overwrite=overwrite,
    )
    return results
