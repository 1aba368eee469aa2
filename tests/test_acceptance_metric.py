"""The acceptance metric as an `evaluate` module: loads from its folder offline and gives the
evaluate stage's numbers."""

import socket
from pathlib import Path

import evaluate
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdraft.pipeline.batches import Collator
from specdraft.pipeline.evaluation import position_acceptance

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "acceptance_rate"
V, PAD = 48, 47


def _no_network(*args, **kwargs):
    raise OSError("network access in an offline test")


@pytest.fixture(scope="module")
def metric():
    # Loading a local folder must not touch the network: every socket connection fails here.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return evaluate.load(str(METRIC_DIR))


def tiny_llama(seed: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def test_loads_from_the_script_path_too(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    script = evaluate.load(str(METRIC_DIR / "acceptance_rate.py"))
    out = script.compute(predictions=[[0.0, 1.0]], references=[[0.0, 1.0]])
    assert out == {"alpha": pytest.approx(1.0), "alpha_greedy": 1.0, "num_positions": 1}


def test_hand_computed_rows(metric):
    # Probabilities given directly: beta = sum min(p, q) per row.
    q = [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]
    p = [[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]]
    out = metric.compute(predictions=q, references=p, input="probs")
    assert out["alpha"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["alpha_greedy"] == 0.0 and out["num_positions"] == 2
    with pytest.raises(ValueError, match="shape"):
        metric.compute(predictions=[[0.0, 1.0]], references=[[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_matches_the_evaluate_stage(metric, temperature):
    target, draft = tiny_llama(0, hidden=32), tiny_llama(1, hidden=16)
    g = torch.Generator().manual_seed(0)
    sequences = []
    for n_prompt, n_response in ((3, 5), (6, 2), (2, 9)):
        ids = torch.randint(0, PAD, (n_prompt + n_response,), generator=g).tolist()
        mask = [0] * n_prompt + [1] * n_response
        sequences.append({"input_ids": ids, "response_mask": mask})
    batch = Collator(PAD)(sequences)
    beta, greedy, agree = position_acceptance(target, draft, batch, temperature)  # (N,) each

    counted = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = [
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for m in (target, draft)
        ]
    target_rows, draft_rows = (x[:, :-1][counted] for x in logits)  # (N, V) each
    out = metric.compute(
        predictions=draft_rows.tolist(), references=target_rows.tolist(), temperature=temperature
    )
    assert out["num_positions"] == len(beta) == 5 + 2 + 9  # every response token is predicted
    assert out["alpha"] == pytest.approx(float(beta.mean()), abs=1e-5)
    assert out["alpha_greedy"] == pytest.approx(float(agree.mean()))
    assert 0 < out["alpha"] < 1
