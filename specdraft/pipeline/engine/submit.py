"""`specdraft submit|status|logs|stop`: run jobs on a Ray cluster through the Ray Jobs SDK.

The working directory (the repository, honouring .gitignore and .rayignore) travels as the job's
`working_dir`; the entrypoint is `specdraft run` with the same job file and overrides, so the
cluster's driver runs the DAG with the cluster's GPUs. The job file must sit inside the working
directory. The cluster needs specdraft installed (as in its image); `store=` should name shared
storage that every node sees (a shared path, or a URL such as s3://bucket/specdraft); fsspec's
settings in this environment (FSSPEC_* variables) go with the job.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from specdraft.errors import InputError
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.job import store_for

AGENT_WAIT_SECONDS = 60.0


AUTH_HELP = (
    "the cluster at {address} uses Ray's token authentication: set RAY_AUTH_MODE=token and "
    "give the cluster's token in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH or in "
    "~/.ray/auth_token (as Ray's own CLI needs)"
)


def _auth_error(err: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    return isinstance(err, AuthenticationError) or "Unauthorized" in str(err)


def _refused(address: str, err: BaseException, what: str) -> InputError:
    if _auth_error(err):
        token_set = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        detail = "the token given was refused" if token_set else "no token was sent"
        return InputError(AUTH_HELP.format(address=address) + f" ({detail})")
    return InputError(f"{what} at {address}: {str(err).splitlines()[0]}")


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise InputError("give the cluster's dashboard address, e.g. --address http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection refused, wrong port, not a Ray dashboard, no token
        raise _refused(address, err, "cannot reach a Ray cluster") from None


def ask(address: str, method: str, *args):
    """One Jobs SDK call (`get_job_status`, `get_job_logs`, `stop_job`, ...), its failure one
    clear message: a job id the cluster does not know, a refused token."""
    jobs = client(address)
    try:
        return getattr(jobs, method)(*args)
    except Exception as err:
        raise _refused(address, err, f"{method.replace('_', ' ')} failed") from None


def fsspec_settings() -> dict[str, str]:
    """fsspec's configuration in this environment (FSSPEC_S3_ENDPOINT_URL, ...): the job's driver
    on the cluster opens the store with the same settings."""
    return {k: v for k, v in os.environ.items() if k.startswith("FSSPEC_")}


def check_cluster(address: str, job) -> None:
    """The job's stages against the cluster's live nodes (read through its dashboard), before
    anything is sent: a job the cluster cannot run is refused here, saying what is missing."""
    from ray.util.state import list_nodes

    from specdraft.pipeline.engine.dag import StageError, check_cluster_resources
    from specdraft.pipeline.engine.job import build_stages

    try:
        nodes = list_nodes(address=address, detail=True)
        nodes = [n.resources_total for n in nodes if n.state == "ALIVE"]
    except Exception as err:  # an old dashboard without the state API, a network error
        raise _refused(address, err, "cannot read the nodes of the cluster") from None
    totals: dict[str, float] = {}
    for node in nodes:
        for resource, amount in node.items():
            totals[resource] = totals.get(resource, 0.0) + amount
    try:
        check_cluster_resources(build_stages(job), totals, nodes)
    except StageError as err:
        raise InputError(str(err)) from None


def submit(job_file: str | None, overrides: list[str], address: str, out: str | None = None) -> str:
    """Validate the job here (and against the cluster's resources), then submit `specdraft run`
    to the cluster; return the job id."""
    job = load_job(job_file, overrides)  # bad jobs fail here, before anything is sent
    store_for(job)
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
    jobs = client(address)
    check_cluster(address, job)
    deadline = time.time() + AGENT_WAIT_SECONDS
    while True:
        try:
            return jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": ".", "env_vars": fsspec_settings()},
                metadata={"specdraft_job": job.name},
            )
        except RuntimeError as err:  # the Jobs SDK's HTTP errors
            if "No available agent" in str(err) and time.time() < deadline:
                time.sleep(1.0)  # a cluster just started: its dashboard agent comes up shortly
                continue
            raise _refused(address, err, "the cluster did not take the job") from None


def wait(address: str, job_id: str, follow_logs: bool, poll_s: float = 1.0) -> str:
    """Wait until the job ends (printing its logs as they come with follow_logs); its status."""
    printed = 0
    while True:
        status = ask(address, "get_job_status", job_id)
        if follow_logs:
            logs = ask(address, "get_job_logs", job_id)
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
        if status.is_terminal():
            return str(status)
        time.sleep(poll_s)
