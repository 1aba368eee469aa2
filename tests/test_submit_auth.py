"""`specdraft submit|status|logs|stop` against a cluster with Ray's token authentication: where
Ray's own CLI would refuse for want of a token, one message names the variables to set.

Checked by hand against `RAY_AUTH_MODE=token ray start --head` (Ray 2.60): without the variable
`specdraft status` exits 2 with this message; with it, `specdraft submit --follow` ran the tiny job
to SUCCEEDED."""

from __future__ import annotations

import pytest
from ray.exceptions import AuthenticationError

from specdraft.pipeline.engine import submit


class _Client:
    def __init__(self, error: Exception):
        self.error = error

    def get_job_status(self, job_id):
        raise self.error


@pytest.mark.parametrize("mode, detail", [("", "no token was sent"), ("token", "was refused")])
def test_a_missing_or_refused_token_names_the_variables(monkeypatch, mode, detail):
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    error = AuthenticationError("Authentication required: Unauthorized: Missing token")
    monkeypatch.setattr(submit, "client", lambda address: _Client(error))
    with pytest.raises(submit.InputError) as raised:
        submit.ask("http://head:8265", "get_job_status", "raysubmit_1")
    message = str(raised.value)
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN" in message and detail in message


def test_other_cluster_errors_keep_their_own_first_line(monkeypatch):
    error = RuntimeError("Request failed with status code 404: Job raysubmit_1 does not exist.\nX")
    monkeypatch.setattr(submit, "client", lambda address: _Client(error))
    with pytest.raises(submit.InputError) as raised:
        submit.ask("http://head:8265", "get_job_status", "raysubmit_1")
    assert str(raised.value) == (
        "get job status failed at http://head:8265: Request failed with status code 404: "
        "Job raysubmit_1 does not exist."
    )
