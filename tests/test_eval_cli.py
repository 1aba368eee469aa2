"""`specdraft eval` end to end on a tiny Llama pair built here, and its bad-input exits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdraft.cli import main
from specdraft.drafts.toyworld import TASKS, train_toy_tokenizer

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang songs of rain".split()
CONTEXT = 512  # max_position_embeddings of both models

METRIC_KEYS = {
    "alpha",
    "alpha_greedy",
    "position_buckets",
    "spec_alpha",
    "tau",
    "per_position",
    "spec_alpha_greedy",
    "tau_greedy",
    "per_position_greedy",
    "tau_predicted",
    "tau_predicted_greedy",
    "cost_ratio",
    "speedup",
    "lossless_greedy",
    "tasks",
}


def tiny_llama(tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        initializer_range=0.2,  # peaky logits: the draft below agrees often, not always
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save(model, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A target, a draft that is a perturbed copy of it, a mismatched draft and a prompt file."""
    root = tmp_path_factory.mktemp("eval_pair")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        picks = torch.randint(0, len(WORDS), (5,), generator=g).tolist()
        rows.append(
            {"question": f"Say {i}: " + " ".join(WORDS[j] for j in picks), "kind": "ab"[i % 2]}
        )
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_toy_tokenizer([r["question"] for r in rows], 300, root / "tok")
    target = tiny_llama(tok, hidden=32, layers=2, seed=0)
    draft = tiny_llama(tok, hidden=32, layers=2, seed=0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    save(target, tok, root / "target")
    save(draft, tok, root / "draft")
    other = train_toy_tokenizer(
        ["zebra quokka lemur " * 9, "completely different words " * 5], 290, root / "other_tok"
    )
    save(tiny_llama(other, hidden=16, layers=1, seed=2), other, root / "other")
    return root


def specdraft(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "specdraft", *args], cwd=cwd, capture_output=True, text=True
    )


def test_eval_writes_the_metrics_of_one_draft(pair):
    out = pair / "eval.json"
    result = specdraft(
        "eval",
        "--target",
        str(pair / "target"),
        "--draft",
        str(pair / "draft"),
        "--data",
        str(pair / "prompts.jsonl"),
        "--prompt-field=question",
        "--task-field=kind",
        "--gamma=3",
        "--temperature=1.0",
        "--max-new-tokens=10",
        "--num-prompts=7",
        "--batch-size=3",
        "--out",
        str(out),
        cwd=pair,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text())
    assert METRIC_KEYS <= set(m)
    assert (m["gamma"], m["temperature"], m["num_prompts"], m["batch_size"]) == (3, 1.0, 7, 3)
    assert (m["target"], m["draft"]) == (str(pair / "target"), str(pair / "draft"))
    assert m["lossless_greedy"] is True and m["num_spec_prompts"] == 7
    assert 0 < m["alpha"] < 1 and 0 < m["alpha_greedy"] <= 1
    assert 1 <= m["tau"] <= 4 and 1 <= m["tau_greedy"] <= 4 and len(m["per_position"]) == 3
    assert m["cost_ratio"] > 0 and m["speedup"] > 0
    assert set(m["tasks"]) == {"a", "b"}
    for task in m["tasks"].values():
        assert {"alpha", "alpha_greedy", "spec_alpha", "tau", "position_buckets"} <= set(task)
    early, late = m["position_buckets"]["early"], m["position_buckets"]["late"]
    assert early["num_positions"] + late["num_positions"] == m["num_positions"]
    assert "lossless greedy check: passed" in result.stdout and "overall" in result.stdout
    assert "speculative" in result.stderr  # the progress bar


def test_eval_on_the_builtin_prompts(pair, capsys):
    code = main(
        [
            "eval",
            "--target",
            str(pair / "target"),
            "--draft",
            str(pair / "draft"),
            "--data",
            "builtin",
            "--num-prompts=4",
            "--max-new-tokens=4",
            "--batch-size=4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert all(task in printed for task in TASKS)  # round-robin: one prompt per task


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--draft": "other"}, "cannot be used together"),
        ({"--gamma": "0"}, "--gamma must be >= 1"),
        ({"--data": "empty.jsonl"}, "no rows"),
        ({"--max-new-tokens": str(CONTEXT - 2)}, "longer than the context"),
    ],
    ids=["tokenizer", "gamma", "empty", "too-long"],
)
def test_bad_input_exits_2_with_one_message(pair, tmp_path, change, message):
    (tmp_path / "empty.jsonl").write_text("")
    args = {
        "--target": str(pair / "target"),
        "--draft": str(pair / "draft"),
        "--data": str(pair / "prompts.jsonl"),
        "--prompt-field": "question",
    }
    for key, value in change.items():
        args[key] = str(pair / value) if value == "other" else value
    if args["--data"] == "empty.jsonl":
        args["--data"] = str(tmp_path / "empty.jsonl")
    out = tmp_path / "eval.json"
    result = specdraft("eval", *[x for kv in args.items() for x in kv], "--out", str(out), cwd=pair)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def pickle_draft(pair):
    """The draft with its weights as pytorch_model.bin only (which specdraft never unpickles)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pair / "pickle_draft"
    model = AutoModelForCausalLM.from_pretrained(pair / "draft")
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # transformers 5 writes no pickles
    AutoTokenizer.from_pretrained(pair / "draft").save_pretrained(path)
    assert (path / "pytorch_model.bin").exists() and not list(path.glob("*.safetensors"))
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("device", "--device cuda:7: not usable on this machine"),
        ("out-dir", "a directory; give a file name"),
        ("out-under-file", "is a file, not a directory"),
        ("pickle", "has only pickle weights (pytorch_model.bin)"),
    ],
)
def test_eval_refuses_before_the_work(pair, pickle_draft, tmp_path, case, message):
    if case == "device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "existing").mkdir()
    (tmp_path / "file").write_text("x")
    out = {"out-dir": "existing", "out-under-file": "file/eval.json"}.get(case, "eval.json")
    args = [
        "eval",
        "--target",
        str(pair / "target"),
        "--draft",
        str(pickle_draft if case == "pickle" else pair / "draft"),
        "--data",
        "builtin",
        "--num-prompts=2",
        "--max-new-tokens=2",
        "--out",
        str(tmp_path / out),
    ]
    if case == "device":
        args.append("--device=cuda:7")
    result = specdraft(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "speculative" not in result.stderr  # refused before any decoding
    assert not (tmp_path / "eval.json").exists() and not list((tmp_path / "existing").iterdir())


def test_run_refuses_pickle_weights_at_the_pair_check(pair, pickle_draft, tmp_path):
    result = specdraft(
        "run",
        f"target={pair / 'target'}",
        f"draft={pickle_draft}",
        f"store={tmp_path / 'store'}",
        "--out",
        str(tmp_path / "out"),
        "--no-ray",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has only pickle weights" in result.stderr and "Traceback" not in result.stderr
    assert "[specdraft]" not in result.stderr  # no stage started
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "store").glob("*") if not p.name.startswith(".")]


def test_run_and_eval_stop_at_one_pair_check_with_one_message(pair):
    from specdraft.drafts.pair import PairError
    from specdraft.pipeline.commands import eval_pair
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine import job

    target, other = str(pair / "target"), str(pair / "other")
    messages = []
    for check, arg in (
        (job.check_models, load_job(None, [f"target={target}", f"draft={other}"])),
        (eval_pair.check_models, eval_pair.EvalRequest(target=target, draft=other, data="builtin")),
    ):
        with pytest.raises(PairError) as err:
            check(arg)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"target {target} and draft {other} cannot be used together:")
    assert "\n  - " in messages[0]
    good = eval_pair.EvalRequest(target=target, draft=str(pair / "draft"), data="builtin")
    assert eval_pair.check_models(good) == CONTEXT  # both cover max_position_embeddings
