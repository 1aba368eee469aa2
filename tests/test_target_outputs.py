"""The target's outputs computed once: KD on the stored hidden states (target_outputs stage) equals
KD that runs the target at every step, and the stage is made once per set of sequences."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_training import Gradients, Tok, sequences, tiny_llama

from specdraft.cli import shipped_job
from specdraft.drafts.pair import PairError, refuse_logit_transforms
from specdraft.pipeline.commands.compare_recipes import build_comparison_stages, load_comparison
from specdraft.pipeline.config import TrainConfig, load_job
from specdraft.pipeline.engine.dag import dep_key, dep_name, plan
from specdraft.pipeline.engine.job import build_stages, target_outputs_name
from specdraft.pipeline.stages.distil import BestAlphaCheckpoint
from specdraft.pipeline.stages.target_outputs import target_hidden_rows
from specdraft.pipeline.stored_target_outputs import StoredTargetOutputs, write_target_outputs
from specdraft.pipeline.trainer import train_kd


def stored_outputs(teacher, data, folder, precision="fp32", batch_size=5):
    rows, head = target_hidden_rows(teacher, data, Tok.pad_token_id, batch_size, precision)
    folder.mkdir(parents=True, exist_ok=True)
    write_target_outputs(folder, rows, head)
    return StoredTargetOutputs.load(folder)


def train(model, teacher, data, folder, *, stored=None, steps=3, precision="fp32", **kw):
    cfg = TrainConfig(
        steps=steps, batch_size=8, lr=1e-2, log_every=1, precision=precision, packing="padded"
    )
    if stored is not None:
        data = data.add_column("row", list(range(len(data))))
        teacher = None
    return train_kd(model, teacher, data, Tok(), cfg, folder, seed=0, target_outputs=stored, **kw)


def test_stored_rows_are_the_live_hidden_states_at_the_response_positions(tmp_path):
    teacher, data = tiny_llama(1, hidden=32, layers=2), sequences(11)
    stored = stored_outputs(teacher, data, tmp_path)
    assert len(stored.offsets) == 12 and stored.head is not None
    for r in (0, 6, 10):
        ids = torch.tensor([data[r]["input_ids"]])
        mask = torch.tensor(data[r]["response_mask"])
        with torch.no_grad():
            hidden = teacher.model(input_ids=ids).last_hidden_state[0, :-1]  # (T-1, H)
        expected = hidden[mask[1:].bool()]
        got = stored.hidden[stored.offsets[r] : stored.offsets[r + 1]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored.head, teacher.lm_head.weight.detach())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"selection": "top", "k": 0.4},
        {"selection": "top", "k": 0.4, "scope": "global"},
        {"divergence": "lk"},
    ],
    ids=["all", "top-microbatch", "top-global", "lk"],
)
def test_stored_outputs_give_the_live_losses_gradients_and_weights(tmp_path, options):
    from specdraft.pipeline.objectives import KDOptions

    teacher, base, reference = tiny_llama(1, hidden=32, layers=2), tiny_llama(2), tiny_llama(3)
    data = sequences(16)
    stored = stored_outputs(teacher, data, tmp_path / "outputs")
    results = {}
    for how in ("live", "stored"):
        grads, model = Gradients(), copy.deepcopy(base)
        history, selection = train(
            model,
            teacher,
            data,
            tmp_path / how,
            stored=stored if how == "stored" else None,
            reference=reference if options.get("selection") else None,
            options=KDOptions(**options),
            callbacks=[grads],
        )
        results[how] = (history, selection, grads.steps, model)
    live, kept = results["live"], results["stored"]
    assert [h["loss"] for h in kept[0]] == pytest.approx([h["loss"] for h in live[0]], rel=1e-5)
    assert kept[1]["kept"] == live[1]["kept"]
    for a, b in zip(kept[2], live[2], strict=True):
        assert b.norm() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for (name, p1), (_, p2) in zip(
        kept[3].named_parameters(), live[3].named_parameters(), strict=True
    ):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5, msg=name)


def test_held_out_alpha_from_stored_outputs_equals_the_live_one(tmp_path):
    teacher, model, data = tiny_llama(1, hidden=32, layers=2), tiny_llama(2), sequences(9)
    stored = stored_outputs(teacher, data, tmp_path)
    rows = list(data.add_column("row", list(range(len(data)))))
    live = BestAlphaCheckpoint(teacher, rows, 0, 1, 1.5).alpha(model)
    read = BestAlphaCheckpoint(None, rows, 0, 1, 1.5, target_outputs=stored).alpha(model)
    assert 0 < live < 1
    assert read == pytest.approx(live, rel=1e-6)


def test_outputs_of_other_sequences_are_refused(tmp_path):
    teacher, data = tiny_llama(1, hidden=32), sequences(16)
    stored = stored_outputs(teacher, sequences(16, seed=5), tmp_path / "other")
    with pytest.raises(RuntimeError, match="made from other sequences"):
        train(tiny_llama(2), teacher, data, tmp_path / "run", stored=stored, steps=1)


def test_bf16_precision_stores_bf16_and_trains_in_bf16(tmp_path):
    teacher, data = tiny_llama(1, hidden=32, layers=2), sequences(8)
    fp32 = stored_outputs(teacher, data, tmp_path / "fp32")
    bf16 = stored_outputs(teacher, data, tmp_path / "bf16", precision="bf16")
    assert fp32.hidden.dtype == torch.float32 and bf16.hidden.dtype == torch.bfloat16
    # the bf16 forward and storage: close to the fp32 states, within bf16's rounding
    torch.testing.assert_close(bf16.hidden.float(), fp32.hidden, atol=0.1, rtol=0.05)
    # a batch comes back in the head's dtype, as the live path hands the loss its hidden states
    batch_rows = torch.tensor([0, 1])
    counted = torch.zeros(2, 1, dtype=torch.bool)
    counted[:, 0] = True
    one_each = StoredTargetOutputs(bf16.hidden, torch.ones(bf16.hidden.shape[0]), bf16.head)
    assert one_each.response_hidden(batch_rows, counted).dtype == torch.float32
    history, _ = train(
        tiny_llama(2), teacher, data, tmp_path / "run", stored=bf16, precision="bf16"
    )
    assert all(map(lambda h: torch.isfinite(torch.tensor(h["loss"])), history))


def test_shards_split_by_size_and_load_whole(tmp_path, monkeypatch):
    import specdraft.pipeline.stored_target_outputs as stored_target_outputs

    teacher, data = tiny_llama(1, hidden=32), sequences(12)
    whole = stored_outputs(teacher, data, tmp_path / "one")
    monkeypatch.setattr(stored_target_outputs, "SHARD_BYTES", whole.hidden.nbytes // 3)
    sharded = stored_outputs(teacher, data, tmp_path / "many")
    files = sorted(p.name for p in (tmp_path / "many").glob("hidden-*"))
    assert len(files) >= 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert torch.equal(sharded.hidden, whole.hidden) and sharded.offsets == whole.offsets
    (tmp_path / "many" / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match="hidden shards"):
        StoredTargetOutputs.load(tmp_path / "many")


def _keys(stages, tmp_path) -> dict[str, str]:
    return {s.name: key for s, key, _ in plan(stages, tmp_path)}


def test_reference_and_every_distil_round_read_one_stage_per_sequences(tmp_path):
    job = load_job(shipped_job("demo.yaml"), ["distil.rounds=3"])
    stages = {s.name: s for s in build_stages(job)}
    made = [n for n in stages if n.startswith("target_outputs")]
    assert made == ["target_outputs", "target_outputs_r2", "target_outputs_r3"]
    assert (
        "target_outputs" in stages["reference"].deps and "target_outputs" in stages["distil"].deps
    )
    assert "target_outputs=target_outputs_r2" in stages["distil_r2"].deps
    assert "generate=generate_r3" in stages["target_outputs_r3"].deps
    assert stages["target_outputs"].config.precision == "fp32"
    # what only distil uses does not make the target's outputs again
    other = load_job(shipped_job("demo.yaml"), ["distil.rounds=3", "distil.k=0.7"])
    before, after = _keys(list(stages.values()), tmp_path), _keys(build_stages(other), tmp_path)
    assert before["target_outputs"] == after["target_outputs"]
    assert before["distil"] != after["distil"]
    # the live path: no stage, and reference and distil read the target
    live = load_job(shipped_job("demo.yaml"), ["distil.stored_target_outputs=false"])
    assert not [s for s in build_stages(live) if "target_outputs" in s.name + str(s.deps)]


def test_bf16_storage_when_the_readers_train_in_bf16():
    bf16 = ["reference.train.precision=bf16", "distil.train.precision=bf16", "distil.rounds=2"]
    stages = {s.name: s for s in build_stages(load_job(shipped_job("demo.yaml"), bf16))}
    assert stages["target_outputs"].config.precision == "bf16"
    assert stages["target_outputs_r2"].config.precision == "bf16"
    # the reference trains in fp32: what it reads stays fp32; later rounds are distil's alone
    mixed = load_job(shipped_job("demo.yaml"), bf16[1:])
    stages = {s.name: s for s in build_stages(mixed)}
    assert stages["target_outputs"].config.precision == "fp32"
    assert stages["target_outputs_r2"].config.precision == "bf16"


def test_every_recipe_on_the_shared_sequences_reads_the_shared_outputs():
    comp = load_comparison(shipped_job("compare.yaml"))
    stages = build_comparison_stages(comp)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    by_name = {s.name: s for s in stages}
    for s in stages:
        if not s.name.startswith("distil"):
            continue
        generate = dep_name(next(d for d in s.deps if dep_key(d) == "generate"))
        outputs = dep_name(next(d for d in s.deps if dep_key(d) == "target_outputs"))
        assert outputs == target_outputs_name(generate) and outputs in by_name
        assert dep_name(by_name[outputs].deps[-1]) == generate
    shared = [s for s in stages if s.name.startswith("distil") and "target_outputs" in s.deps]
    assert len(shared) >= 2 * len(comp.seeds)  # at least two recipes reuse the one stage


def test_the_pair_check_refuses_logit_transforms(tmp_path):
    from test_pair import TEXT, save_model, train_bpe

    from specdraft.drafts.pair import check_pair

    tok = train_bpe(TEXT)
    target = save_model(tmp_path / "target", tok)
    draft = save_model(tmp_path / "draft", tok)
    assert check_pair(target, draft).ok
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (tmp_path / "target" / "config.json").write_text(json.dumps(config))
    report = check_pair(target, draft)
    assert len(report.problems) == 1
    assert "target's logits" in report.problems[0]
    assert "final_logit_softcapping = 30.0" in report.problems[0]


def test_a_loaded_model_with_a_head_bias_or_logit_scale_is_refused():
    model = tiny_llama(0)
    refuse_logit_transforms(model, "target")  # plain hidden @ head.T
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(PairError, match="an LM-head bias"):
        refuse_logit_transforms(model, "target")
    scaled = tiny_llama(0)
    scaled.config.logits_scaling = 4.0
    with pytest.raises(PairError, match=r"the draft's logits .*logits_scaling = 4.0"):
        refuse_logit_transforms(scaled, "draft")


@pytest.mark.integration  # a whole (tiny) job
def test_a_second_recipe_reuses_the_stored_outputs_and_the_first_round_reads_them(tmp_path):
    """The tiny job's stages up to round 2, in this process; then again with a distil-only change
    (another recipe): the run log says target_outputs was reused, not made again."""
    from conftest import TINY

    from specdraft.pipeline.engine.dag import execute
    from specdraft.pipeline.sequences import load_sequences

    wanted = {
        "data", "target", "draft_init", "generate", "target_outputs", "reference", "distil",
        "generate_r2", "target_outputs_r2", "distil_r2",
    }  # fmt: skip
    runs = []
    for extra in ([], ["distil.k=0.7"]):
        job = load_job(shipped_job("demo.yaml"), TINY + extra)
        log: list[str] = []
        stages = [s for s in build_stages(job) if s.name in wanted]
        runs.append((execute(stages, tmp_path, use_ray=False, say=log.append), log))
    (first, first_log), (second, second_log) = runs
    made = first["target_outputs"].path
    for stage in ("reference", "distil"):
        assert first[stage].manifest["inputs"]["target_outputs"] == str(made)
    assert first["distil_r2"].manifest["inputs"]["target_outputs"] == str(
        first["target_outputs_r2"].path
    )
    assert first["target_outputs"].manifest["info"]["rows"] == len(
        load_sequences(first["generate"].path)
    )
    assert any(line.startswith("target_outputs started") for line in first_log)
    assert f"target_outputs reused   {made}" in second_log
    assert second["distil"].path != first["distil"].path  # the recipe itself did run
