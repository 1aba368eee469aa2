"""The command line's surface: every command's help, its arguments, and the top-level listing."""

from __future__ import annotations

import re

import pytest

from specdraft import cli
from specdraft.cli import COMMANDS, main

RUN_ARGUMENTS = ["job", "overrides", "--out", "--overwrite", "--force", "--address", "--plan"]
RUN_ARGUMENTS += ["--no-ray"]

# What users and scripts rely on: each command's arguments, exactly (a removed or renamed one fails)
ARGUMENTS = {
    "run": RUN_ARGUMENTS,
    "compare": RUN_ARGUMENTS,
    "validate": ["job", "overrides"],
    "export": ["run_dir", "--to", "--dtype", "--overwrite", "--store"],
    "eval": [
        *("--target", "--draft", "--data", "--gamma", "--temperature", "--drafting"),
        "--max-new-tokens",
        *("--num-prompts", "--batch-size", "--prompt-field", "--task-field", "--split"),
        *("--chat-template", "--dtype", "--device", "--trust-remote-code", "--vocabulary"),
        *("--seed", "--out"),
    ],
    "report": [
        *("RUN_DIR", "--history", "--out", "--threshold", "--window", "--fail-on-regression"),
        "--code-version",
    ],
    "check-pair": [
        "target",
        "draft",
        "--context-length",
        "--vocabulary",
        "--min-intersection",
        "--text",
        "--trust-remote-code",
    ],
    "serve-check": [
        "run_dir",
        "--engine",
        "--gamma",
        "--temperature",
        "--prompts",
        "--drafting",
        "--speed",
        "--gammas",
        "--concurrency",
        "--repeats",
        "--baseline",
        "--setup",
    ],
    "verify-store": ["--store", "--repair"],
    "submit": ["job", "overrides", "--address", "--out", "--follow"],
    "status": ["job_id", "--address"],
    "logs": ["job_id", "--address", "--follow"],
    "stop": ["job_id", "--address"],
}
CLUSTER = ["submit", "status", "logs", "stop"]


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def listed_arguments(text: str) -> set[str]:
    """The arguments a help text lists: argparse starts each one's line with two spaces."""
    return set(re.findall(r"^  ([-\w]+)", text, flags=re.MULTILINE)) - {"-h"}


def test_the_table_has_every_command():
    assert list(COMMANDS) != [] and set(COMMANDS) == set(ARGUMENTS)


@pytest.mark.parametrize("name", list(ARGUMENTS))
def test_command_help_lists_its_own_arguments(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_of([name], capsys)
    assert text.startswith(f"usage: specdraft {name} ")
    assert COMMANDS[name].help in " ".join(text.split())  # what the command does, under usage
    assert listed_arguments(text) == set(ARGUMENTS[name])


def test_top_level_help_lists_every_command_by_group(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_of([], capsys)
    assert text.startswith("usage: specdraft ")
    listed = re.findall(r"^  ([a-z-]+) +(.+)$", text, flags=re.MULTILINE)
    assert dict(listed) == {name: command.help for name, command in COMMANDS.items()}
    # the cluster verbs sit together under one heading, and nothing else does
    blocks = text.split("\n\n")
    cluster = next(b for b in blocks if b.startswith("On a Ray cluster"))
    assert re.findall(r"^  ([a-z-]+) ", cluster, flags=re.MULTILINE) == CLUSTER


def test_module_docstring_lists_every_command():
    listed = re.findall(r"^  ([a-z-]+) +\S", cli.__doc__, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["export"]])
def test_usage_mistakes_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: specdraft" in capsys.readouterr().err


def test_overrides_may_follow_options():
    """`specdraft run job a=1 --no-ray b=2`: argparse ends the positional list at the option; the
    later override is kept, in order, not refused as an unrecognised argument."""
    args = cli._parse(cli.build_parser(), ["run", "gemma3", "a.b=1", "--no-ray", "c.d=2"])
    assert (args.job, args.overrides, args.no_ray) == ("gemma3", ["a.b=1", "c.d=2"], True)
    with pytest.raises(SystemExit) as exit_:
        cli._parse(cli.build_parser(), ["run", "gemma3", "a.b=1", "--no-ray", "--bogus"])
    assert exit_.value.code == 2
