"""Acceptance rate of speculative decoding, as an `evaluate` metric.

    import evaluate
    metric = evaluate.load("metrics/acceptance_rate")  # a local path: works offline
    metric.compute(predictions=draft_logits, references=target_logits, temperature=1.0)

Self-contained (numpy only) so the folder can be copied or pushed to the Hub on its own: a copy of
specdraft's one implementation, specdraft/kernels/acceptance.py (token_acceptance, on the chunked KD
kernel), which the evaluate stage, distil and the LK loss call; tests/test_acceptance_metric.py
checks that the two agree.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Expected acceptance of one drafted token in speculative decoding, from the draft's and the target's
next-token distributions at the same positions. With p = softmax(target / T) and
q = softmax(draft / T), a token drafted from q is accepted with probability
beta = sum_v min(p_v, q_v) = 1 - TVD(p, q); `alpha` is its mean over positions (DistillSpec's
definition). `alpha_greedy` is the share of positions where argmax q == argmax p, the acceptance
rate of greedy speculative decoding. At temperature 0, alpha is alpha_greedy.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: the draft's rows, shape (N, V): logits, or probabilities with input="probs".
    references: the target's rows at the same N positions, shape (N, V).
    temperature: softmax temperature of both models (default 1.0; 0 = greedy). Ignored for probs.
    input: "logits" (default) or "probs".
Returns:
    alpha: mean over positions of sum_v min(p_v, q_v).
    alpha_greedy: mean over positions of [argmax q == argmax p].
    num_positions: N.
Examples:
    >>> metric = evaluate.load("metrics/acceptance_rate")
    >>> metric.compute(predictions=[[0.0, 0.0]], references=[[0.0, 0.0]])
    {'alpha': 1.0, 'alpha_greedy': 1.0, 'num_positions': 1}
"""

_CITATION = """\
@inproceedings{zhou2024distillspec,
  title={DistillSpec: Improving Speculative Decoding via Knowledge Distillation},
  author={Zhou, Yongchao and Lyu, Kaifeng and Rawat, Ankit Singh and Menon, Aditya Krishna and
          Rostamizadeh, Afshin and Kumar, Sanjiv and Kagy, Jean-Fran{\\c{c}}ois and Agarwal, Rishabh},
  booktitle={ICLR},
  year={2024}
}
"""


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AcceptanceRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2310.08461", "https://arxiv.org/abs/2211.17192"],
        )

    def _compute(self, predictions, references, temperature=1.0, input="logits"):
        q = np.asarray(predictions, dtype=np.float64)  # (N, V) draft
        p = np.asarray(references, dtype=np.float64)  # (N, V) target
        if q.ndim != 2 or q.shape != p.shape:
            raise ValueError(
                f"predictions and references must both have shape (N, V); got {q.shape} and {p.shape}"
            )
        if input not in ("logits", "probs"):
            raise ValueError(f"input must be 'logits' or 'probs', got {input!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        agree = (q.argmax(-1) == p.argmax(-1)).astype(np.float64)  # (N,)
        if input == "logits" and temperature == 0:
            beta = agree
        else:
            if input == "logits":
                p, q = _softmax(p, temperature), _softmax(q, temperature)
            beta = np.minimum(p, q).sum(-1)  # (N,)
        return {
            "alpha": float(beta.mean()),
            "alpha_greedy": float(agree.mean()),
            "num_positions": int(len(beta)),
        }
