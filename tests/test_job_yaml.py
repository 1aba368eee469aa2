"""Hostile and careless job files: alias bombs, duplicate keys, deep nesting, huge values. Each is
one message and exit code 2, at once."""

import subprocess
import sys
import time

import pytest

from specdraft.cli import main
from specdraft.pipeline.config import ConfigError, load_job, read_job_yaml


def alias_bomb(levels: int) -> str:
    """A few hundred bytes that yaml expands to 9**levels strings."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]")
    lines.append(f"distil:\n  k: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_with_one_message(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))  # 9**9 strings once expanded; ~430 bytes
    assert bomb.stat().st_size < 600
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "specdraft", "validate", str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "expands (through its aliases) to more than 10000 values" in result.stderr
    assert len(result.stderr) < 1000 and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # a hang before; ~1 s of it is Python starting


def test_a_value_within_the_budget_is_printed_cut_short(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    rows = ", ".join(f"[{i}, {i}, {i}, {i}]" for i in range(1500))  # 7501 values: within budget
    job.write_text(f"distil:\n  k: [{rows}]\n  divergence: {'x' * 5000}\n")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "distil.k: expected a number, got [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]," in err
    assert (
        "distil.divergence: 'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx' is" in err
    )
    assert len(err) < 1000


def test_a_huge_override_value_is_printed_cut_short(capsys):
    with pytest.raises(ConfigError) as caught:
        load_job(None, ["distil.k=" + "9" * 100_000 + "x"])
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "text, message",
    [
        ("distil:\n  divergence: fkl\ndistil:\n  k: 0.5\n", "key 'distil' is given twice"),
        ("distil:\n  k: 0.5\n  k: 0.6\n", "key 'k' is given twice in one mapping (lines 2 and 3)"),
        (
            "compare:\n  recipes:\n    a: {set: {distil.k: 0.5}}\n    b: {set: {}}\n"
            "    a: {set: {distil.k: 0.3}}\n",
            "key 'a' is given twice in one mapping (lines 3 and 5)",
        ),
    ],
    ids=["section", "setting", "recipe"],
)
def test_duplicate_keys_are_refused_naming_the_key_and_lines(tmp_path, capsys, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("given twice") == 1


def test_a_merge_key_may_be_overridden(tmp_path):
    """`<<:` merges are meant to be overridden: not a duplicate."""
    job = tmp_path / "job.yaml"
    job.write_text("base: &b {k: 0.5, selection: top}\ndistil:\n  <<: *b\n  k: 0.6\n")
    assert read_job_yaml(job)["distil"] == {"k": 0.6, "selection": "top"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("".join("  " * i + "a:\n" for i in range(3000)), "nested deeper than 64 levels"),
        ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 64 levels"),
        ("a: &x [1, *x]\n", "an alias refers to a value that contains it"),
    ],
    ids=["block-3000", "flow-20000", "recursive-alias"],
)
def test_deep_or_recursive_yaml_is_one_message(tmp_path, capsys, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert main(["validate", str(job)]) == 2  # a RecursionError before
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_override_bomb_is_a_problem_not_a_hang():
    with pytest.raises(ConfigError, match="override distil.k: nested deeper than 64"):
        load_job(None, ["distil.k=" + "[" * 5000 + "]" * 5000])
