"""generate and target_outputs killed mid-stage resume from their finished parts: the second
attempt samples (or runs the target over) only what the first left undone, and the artifacts
equal an uninterrupted run's."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from specdraft.cli import shipped_job
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.dag import execute
from specdraft.pipeline.engine.job import build_stages
from specdraft.pipeline.sequences import load_sequences
from specdraft.pipeline.stages import generate, target_outputs

WANTED = ("data", "target", "generate", "target_outputs")


def stages():
    overrides = [
        *TINY,
        "generate.draft_fraction=0",
        "generate.dataset_fraction=0",
        "generate.num_prompts=11",
        "generate.batch_size=2",
        "target_outputs.format=topk",
        "target_outputs.k=8",
    ]
    job = load_job(shipped_job("demo.yaml"), overrides)
    return [s for s in build_stages(job) if s.name in WANTED]


class Killer:
    """Wraps a stage's per-part function: counts the parts it runs and fails at call `fail_at`."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed mid-stage")
        return self.fn(*args, **kwargs)


def test_generate_and_target_outputs_resume_from_their_finished_parts(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(generate, "PART_PROMPTS", 4)  # parts of 2 batches of 2: 4 + 4 + 3
    monkeypatch.setattr(target_outputs, "PART_SEQUENCES", 4)  # 4 + 4 + 3 sequences
    quiet = {"use_ray": False, "say": lambda _: None}
    whole = execute(stages(), tmp_path / "whole", **quiet)

    store = tmp_path / "store"
    sampler = Killer(generate.sample_responses, fail_at=2)
    monkeypatch.setattr(generate, "sample_responses", sampler)
    with pytest.raises(Exception, match="killed mid-stage"):
        execute(stages(), store, **quiet)
    (kept,) = store.glob(".ckpt-generate-*")
    assert sorted(p.name for p in kept.iterdir()) == ["target-0000000-0000004.json"]

    sampler = Killer(generate.sample_responses.fn)
    monkeypatch.setattr(generate, "sample_responses", sampler)
    rows = Killer(target_outputs.target_topk_rows, fail_at=3)
    monkeypatch.setattr(target_outputs, "target_topk_rows", rows)
    with pytest.raises(Exception, match="killed mid-stage"):
        execute(stages(), store, **quiet)
    assert sampler.calls == 2  # the first part read back, the other two sampled
    assert "4 of 11 responses read back from a previous attempt" in capsys.readouterr().out
    assert not list(store.glob(".ckpt-generate-*"))  # published: its parts are gone
    (kept,) = store.glob(".ckpt-target_outputs-*")
    assert len(list(kept.glob("part-*.safetensors"))) == 2

    rows = Killer(rows.fn)
    monkeypatch.setattr(target_outputs, "target_topk_rows", rows)
    made = execute(stages(), store, **quiet)
    assert rows.calls == 1  # only the third part
    assert "8 sequences' rows read back from a previous attempt" in capsys.readouterr().out
    assert not list(store.glob(".ckpt-*"))
    assert made["generate"].key == whole["generate"].key  # same stages, same keys
    a, b = (load_sequences(r["generate"].path) for r in (whole, made))
    assert a["input_ids"] == b["input_ids"] and a["response_mask"] == b["response_mask"]
    from safetensors.torch import load_file

    names = sorted(p.name for p in whole["target_outputs"].path.glob("topk-*.safetensors"))
    assert names
    for name in names:
        x = load_file(whole["target_outputs"].path / name)
        y = load_file(made["target_outputs"].path / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
