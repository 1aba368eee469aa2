"""`specdraft submit|status|logs|stop`: run jobs on a Ray cluster through the Ray Jobs SDK.

The working directory (the repository, honouring .gitignore and .rayignore) travels as the job's
`working_dir`; the entrypoint is `specdraft run` with the same job file and overrides, so the
cluster's driver runs the DAG with the cluster's GPUs. The job file must sit inside the working
directory. The cluster needs specdraft installed (as in its image); `store=` should name shared
storage that every node sees.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.config import load_job


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise InputError("give the cluster's dashboard address, e.g. --address http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, wrong port, not a Ray dashboard
        raise InputError(
            f"cannot reach a Ray cluster at {address}: {str(err).splitlines()[0]}"
        ) from None


def submit(job_file: str | None, overrides: list[str], address: str, out: str | None = None) -> str:
    """Validate the job here, then submit `specdraft run` to the cluster; return the job id."""
    job = load_job(job_file, overrides)  # bad jobs fail here, before anything is sent
    words = ["specdraft", "run"]
    if job_file is not None:
        path = Path(job_file).resolve()
        try:
            words.append(str(path.relative_to(Path.cwd().resolve())))
        except ValueError:
            raise InputError(
                f"{job_file} is outside the working directory {Path.cwd()}; the cluster only gets "
                "the working directory, so put the job file inside it"
            ) from None
    words += [*overrides, "--out", out or f"runs/{job.name}"]
    entrypoint = " ".join(shlex.quote(w) for w in words)
    return client(address).submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": "."},
        metadata={"specdraft_job": job.name},
    )


def wait(address: str, job_id: str, follow_logs: bool, poll_s: float = 1.0) -> str:
    """Wait until the job ends (printing its logs as they come with follow_logs); its status."""
    jobs = client(address)
    printed = 0
    while True:
        status = jobs.get_job_status(job_id)
        if follow_logs:
            logs = jobs.get_job_logs(job_id)
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
        if status.is_terminal():
            return str(status)
        time.sleep(poll_s)
