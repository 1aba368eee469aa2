"""SPECDRAFT_* variables are checked like config values: one message naming the variable, exit
code 2, before any stage runs; never at import. A Ray address that answers nothing is refused."""

import os
import subprocess
import sys
import time

import pytest

from specdraft.cli import main
from specdraft.errors import InputError
from specdraft.pipeline.engine import environment
from specdraft.pipeline.engine.dag import Stage, execute

MODULE = "dag_stages"


@pytest.mark.parametrize(
    "name, value",
    [
        ("SPECDRAFT_VERIFY_HASH_BYTES", "abc"),
        ("SPECDRAFT_VERIFY_HASH_BYTES", "-1"),
        ("SPECDRAFT_LOCK_LEASE", "abc"),
        ("SPECDRAFT_LOCK_LEASE", "inf"),
        ("SPECDRAFT_LOCK_LEASE", "0"),
        ("SPECDRAFT_LOCK_LEASE", "-5"),
        ("SPECDRAFT_PLACEMENT_TIMEOUT", "nan"),
        ("SPECDRAFT_VLLM_MEMORY_FRACTION", "2"),
    ],
)
def test_a_bad_variable_fails_validate_with_one_message(monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    assert main(["validate"]) == 2
    err = capsys.readouterr().err
    assert f"${name}={value!r}: expected" in err and "Traceback" not in err
    assert err.count("expected") == 1


def test_a_bad_variable_does_not_break_importing(monkeypatch):
    """It was read at import: every command failed with a ValueError traceback."""
    env = {"SPECDRAFT_VERIFY_HASH_BYTES": "abc", "SPECDRAFT_LOCK_LEASE": "abc"}
    code = "import specdraft.cli, specdraft.pipeline.engine.dag, specdraft.pipeline.engine.lock"
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True
    )
    assert result.returncode == 0, result.stderr


def test_the_engine_refuses_a_bad_variable_before_any_stage(tmp_path, calls, monkeypatch):
    """SPECDRAFT_LOCK_LEASE=abc was read after the first stages ran (a traceback)."""
    monkeypatch.setenv("SPECDRAFT_LOCK_LEASE", "abc")
    stages = [Stage("a", MODULE, {"name": "a", "add": 1})]
    with pytest.raises(InputError, match=r"\$SPECDRAFT_LOCK_LEASE='abc': expected a number"):
        execute(stages, tmp_path / "store", use_ray=False, say=lambda _: None)
    assert calls() == []


def test_unset_or_empty_variables_take_their_defaults(monkeypatch):
    for name in ("SPECDRAFT_LOCK_LEASE", "SPECDRAFT_VERIFY_HASH_BYTES"):
        monkeypatch.setenv(name, "")
    assert environment.lock_lease() == 60.0
    assert environment.hash_on_reuse_bytes() == 64 * 2**20
    assert environment.environment_problems() == []


@pytest.mark.parametrize(
    "address, message",
    [
        ("garbage:123", "cannot reach garbage:123"),
        ("127.0.0.1:1", "cannot reach 127.0.0.1:1"),
        ("nonsense", "expected HOST:PORT"),
        ("host:port", "expected HOST:PORT"),
    ],
)
def test_an_unreachable_ray_address_is_refused_quickly(address, message):
    started = time.monotonic()
    with pytest.raises(InputError, match=message) as caught:
        environment.check_ray_address(address, "$RAY_ADDRESS")
    assert "unset it ($RAY_ADDRESS)" in str(caught.value)
    assert time.monotonic() - started < environment.RAY_CONNECT_SECONDS + 5  # Ray: minutes


def test_execute_checks_ray_address_before_starting_ray(tmp_path, calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    import ray

    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init was called"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    stages = [Stage("a", MODULE, {"name": "a", "add": 1})]
    with pytest.raises(InputError, match="Ray address '127.0.0.1:1' from \\$RAY_ADDRESS"):
        execute(stages, tmp_path / "store", use_ray=True, say=lambda _: None)
    assert calls() == []
