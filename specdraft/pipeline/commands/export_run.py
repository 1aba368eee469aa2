"""`specdraft export RUN_DIR --to DIR`: export a finished run's draft again (e.g. in another dtype),
from the store, with the run's own settings.

The run's artifacts are found by name (`<stage>-<key>`, the last part of every location run.json
records) in the store this command uses (rundir.run_store: the one given, else $SPECDRAFT_STORE,
else the one the run's job named, else the default), never at the recorded absolute paths: a store
moved or copied since is read where it is now. Model code runs as the run's job allowed it, per
model (job.yaml's target/draft.trust_remote_code), so a custom-code draft exports as it trained.

`--to` is refused before anything is read when it is, holds or lies inside the run directory,
the store or the target's model folder (the export would delete what it reads), when it is a
run directory of specdraft (unless --overwrite), or a folder specdraft did not write (unless
--overwrite).
"""

from __future__ import annotations

from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.engine.rundir import (
    building,
    check_apart,
    check_destination,
    read_run,
    read_run_job,
    recorded_inputs,
    run_store,
    run_trust,
    stored_artifacts,
)

# What export_draft reads; draft_init (the card's base model) only when the run recorded it.
EXPORT_INPUTS = ("data", "target", "distil", "evaluate")


def export_run(
    run_dir: Path,
    to: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    store: str | None = None,
) -> Path:
    """Write the draft of the run `run_dir` to `to` (published whole, as `specdraft run` publishes
    its --out); return `to`. InputError before any work for a run or destination that cannot be
    used, or artifacts the store lacks."""
    from specdraft.drafts.pair import shipped_code, untrusted_code_message
    from specdraft.pipeline.engine.artifacts import model_location
    from specdraft.pipeline.stages.export import export_draft

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run["kind"] == "comparison":
        raise InputError(
            f"{run_dir} is the run directory of a comparison (specdraft compare), which has no "
            "single draft; give the --out of `specdraft run`"
        )
    to = Path(to).expanduser().absolute()
    check_destination(to, overwrite=overwrite, flag="--to", kind="draft")
    recorded = recorded_inputs(run, run_dir, "export", EXPORT_INPUTS)
    job = read_run_job(run_dir)
    the_store, source = run_store(job, store)
    check_apart(to, {"the run directory": run_dir, "the store": the_store.local}, flag="--to")
    inputs = stored_artifacts(the_store, recorded, source)
    target = model_location(inputs["target"])
    if Path(target).is_absolute():
        check_apart(to, {"the target model": Path(target)}, flag="--to")
    trust = run_trust(job)
    for role, where, trusted in (
        ("draft", model_location(inputs["distil"]), trust.draft),
        ("target", target, trust.target),
    ):
        modules = [] if trusted else shipped_code(where)
        if modules:  # refused here, not as a transformers error after the load began
            raise InputError(
                f"the run's {role} {where}: {untrusted_code_message(role, modules)} (the run's "
                f"{run_dir / 'job.yaml'} does not trust it)"
            )
    with building(to, overwrite=overwrite, flag="--to", kind="draft") as tmp:
        export_draft(inputs, tmp, dtype, trust=trust)
    return to
