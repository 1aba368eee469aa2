"""Vocabulary-trimmed drafts (VocabTrim) and the served view's id mapping (vLLM's
use_heterogeneous_vocab rule), on tiny Gemma-3-shaped and Llama models and hand-made tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from specdraft.drafts.models import first_layers_model, load_causal_lm
from specdraft.drafts.pair import check_pair
from specdraft.drafts.vocab_map import served_vocabulary_map
from specdraft.drafts.vocab_trim import (
    ADDED_UNK,
    KEPT_IDS_FILE,
    check_keep_vocab,
    count_tokens,
    most_frequent_ids,
    served_map_for,
    special_token_ids,
    write_trimmed_draft,
)
from specdraft.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from served_kd import check_distillation_through_the_map  # noqa: E402
from tiny_gemma import gemma_wordlevel_tokenizer, tiny_gemma3  # noqa: E402
from vllm_mapping import needs_vllm, vllm_tables  # noqa: E402

# --------------------------------------------------------------------------- hand-made vocabularies


def wordlevel(vocab: dict[str, int], pre_tokenizer=None, **specials) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `vocab`, with a pre-tokenizer that decides what " a" becomes
    (the probe vLLM detects the space marker with)."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token", "<unk>")))
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
METASPACE = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")

# A byte-level target (" a" -> "Ġa") and a SentencePiece draft (" a" -> "▁a").
TARGET_VOCAB = {
    "<unk>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "\u0120a": 3,  # Ġa
    "a": 4,
    "\u0120cat": 5,
    "dog": 6,
    "\u0120": 7,
    "x": 8,
}
DRAFT_VOCAB = {
    "<s>": 0,
    "</s>": 1,
    "\u2581a": 2,  # ▁a
    "\u2581cat": 3,
    "dog": 4,
    "a": 5,
    "<unk>": 6,
    "\u2581": 7,
    "y": 8,
}


def hand_made_pair():
    target = wordlevel(TARGET_VOCAB, BYTE_LEVEL, unk_token="<unk>", eos_token="<eos>")
    draft = wordlevel(DRAFT_VOCAB, METASPACE, unk_token="<unk>", eos_token="</s>")
    return target, draft


def test_the_mapping_is_vllms_rule_on_hand_made_vocabularies():
    """Space markers normalised per tokenizer (Ġ on one side, ▁ on the other), specials matched
    by string, everything else outside; unmapped ids become the other side's unk."""
    target, draft = hand_made_pair()
    m = served_vocabulary_map(target, draft, len(TARGET_VOCAB), len(DRAFT_VOCAB))
    # <unk> 0<->6, " a" 3<->2, "a" 4<->5, " cat" 5<->3, "dog" 6<->4, " " 7<->7
    assert m.target_to_draft.tolist() == [6, -1, -1, 2, 5, 3, 4, 7, -1]
    assert m.draft_to_target.tolist() == [-1, -1, 3, 5, 6, 4, 0, 7, -1]
    assert m.intersection == 6
    assert m.to_draft(torch.tensor([[1, 3, 8, 6]])).tolist() == [[6, 2, 6, 4]]
    assert m.to_target(torch.tensor([0, 2, 8, 3])).tolist() == [0, 3, 0, 5]
    logits = m.mask_draft_logits(torch.arange(9.0))
    assert torch.isinf(logits[[0, 1, 8]]).all() and logits[[2, 3, 4, 5, 6, 7]].tolist() == [
        2.0,
        3.0,
        4.0,
        5.0,
        6.0,
        7.0,
    ]
    drafts, targets = m.intersection_rows()
    assert drafts.tolist() == [2, 3, 4, 5, 6, 7] and targets.tolist() == [3, 5, 6, 4, 0, 7]
    # the draft's best id outside the intersection (8) is never drafted: the best inside (draft
    # id 2) is, as the target's id 3
    assert m.greedy_draft(torch.tensor([[0.0, 0, 1, 0, 0, 0, 0, 0, 9]])).tolist() == [3]


def test_ids_past_vocab_size_stay_out_and_a_failed_probe_normalises_both_markers():
    target, _ = hand_made_pair()
    # no pre-tokenizer: " a" is one unknown word, so the probe fails and both Ġ and ▁ normalise
    draft = wordlevel({"\u0120cat": 0, "\u2581a": 1, "<unk>": 2, " ": 3}, unk_token="<unk>")
    m = served_vocabulary_map(target, draft, 7, 4)  # the target's ids 7 and 8 are past its rows
    assert m.draft_to_target.tolist() == [5, 3, 0, -1]  # " " is the target's id 7: out
    assert m.target_to_draft.tolist() == [2, -1, -1, 1, -1, 0, -1]


def test_a_draft_without_unk_falls_back_to_its_eos_and_neither_is_refused():
    target, _ = hand_made_pair()
    draft = wordlevel({"dog": 0, "</s>": 1}, eos_token="</s>", unk_token=None)
    draft.unk_token = None
    m = served_vocabulary_map(target, draft, 9, 2)
    assert m.draft_fallback_id == 1 and m.to_draft(torch.tensor([3])).tolist() == [1]
    draft.eos_token = None
    with pytest.raises(InputError, match="neither an unk nor an eos"):
        served_vocabulary_map(target, draft, 9, 2)


@pytest.mark.integration
@needs_vllm
def test_the_mapping_equals_vllms_own_on_saved_tokenizers(tmp_path):
    """vLLM's VocabMapping (the installed engine's) and ours give the same tables."""
    target, draft = hand_made_pair()
    target.save_pretrained(tmp_path / "t")
    draft.save_pretrained(tmp_path / "d")
    theirs = vllm_tables(tmp_path / "t", tmp_path / "d", 9, 9)
    ours = served_vocabulary_map(
        AutoTokenizer.from_pretrained(tmp_path / "t"),
        AutoTokenizer.from_pretrained(tmp_path / "d"),
        9,
        9,
    )
    assert theirs == [ours.target_to_draft.tolist(), ours.draft_to_target.tolist()]


# --------------------------------------------------------------------------- trimmed drafts

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "park", "sun", "rain"]


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style vocabulary laid out as Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3."""
    return gemma_wordlevel_tokenizer(WORDS, WORDS + list("abcdefghij"))


def sequences_of(tokenizer, texts: list[str], prompt_tokens: int = 2) -> list[dict]:
    rows = []
    for text in texts:
        ids = tokenizer(text).input_ids
        rows.append(
            {"input_ids": ids, "response_mask": [i >= prompt_tokens for i in range(len(ids))]}
        )
    return rows


def test_kept_ids_are_specials_then_the_most_frequent_responses_then_prompts_then_ids():
    response = torch.tensor([0, 0, 5, 1, 5, 0, 0, 2])
    prompt = torch.tensor([0, 0, 0, 9, 1, 3, 3, 0])
    # specials 0, 1; then 4 (5, 1) before 2 (5, 0); then 7 (2); then 3 (1, 9); then 5 and 6 tie: id 5
    assert most_frequent_ids(response, prompt, 6, [0, 1]) == [0, 1, 2, 3, 4, 7]
    assert most_frequent_ids(response, prompt, 7, [0, 1]) == [0, 1, 2, 3, 4, 5, 7]
    rows = [{"input_ids": [2, 4, 4, 7], "response_mask": [False, False, True, True]}]
    r, p = count_tokens(rows, 8)
    assert r.tolist() == [0, 0, 0, 0, 1, 0, 0, 1] and p.tolist() == [0, 0, 1, 0, 1, 0, 0, 0]


def trimmed_gemma(tmp_path, keep: int = 14):
    """A tiny Gemma-3 target, its first 2 layers as the draft, trimmed to `keep` ids by frequency
    on two sentences."""
    tok = gemma_tokenizer()
    target = tiny_gemma3(len(tok))
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    draft = first_layers_model(target, 2)
    rows = sequences_of(tok, ["the cat sat on a mat", "the dog ran to the park"])
    response, prompt = count_tokens(rows, len(tok))
    kept = most_frequent_ids(response, prompt, keep, special_token_ids(tok))
    info = write_trimmed_draft(draft, tok, kept, tmp_path / "trimmed")
    return tok, draft, kept, info


def test_a_trimmed_drafts_logits_over_its_kept_set_are_the_full_drafts_rows(tmp_path):
    """Gemma-3 shape (tied, scaled embeddings): on context inside the kept set the trimmed draft's
    logits are the full draft's at the kept ids, so its distribution is the full one restricted
    to them and renormalised."""
    tok, draft, kept, info = trimmed_gemma(tmp_path)
    assert info["draft_vocab"] == 14 and not info["added_unk"]
    trimmed = load_causal_lm(tmp_path / "trimmed")
    assert trimmed.get_input_embeddings().weight.shape[0] == 14
    m = served_map_for(tok, len(tok), tmp_path / "trimmed")
    assert m.intersection == 14
    ids = torch.tensor([tok("the cat sat on the mat").input_ids])
    assert (m.to_draft(ids) != m.draft_fallback_id).all()  # every context token is kept
    with torch.no_grad():
        full = draft(ids).logits[0]  # (T, V)
        small = trimmed(m.to_draft(ids)).logits[0]  # (T, K)
    drafts, targets = m.intersection_rows()
    torch.testing.assert_close(small[:, drafts], full[:, targets], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        small.softmax(-1), full[:, targets].softmax(-1), rtol=0, atol=1e-6
    )  # restricted and renormalised
    # a context token outside the set reaches the draft as its unk
    outside = [i for i in range(len(tok)) if i not in kept][0]
    assert m.to_draft(torch.tensor([outside])).tolist() == [tok.unk_token_id]


def test_the_exported_tokenizer_holds_exactly_the_kept_strings(tmp_path):
    tok, _, kept, _ = trimmed_gemma(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path / "trimmed")
    strings = tok.convert_ids_to_tokens(kept)
    assert saved.get_vocab() == {s: i for i, s in enumerate(strings)}
    assert saved.unk_token == "<unk>" and saved.convert_ids_to_tokens(saved.unk_token_id) == "<unk>"
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == ("<bos>", "<eos>", "<pad>")
    config = json.loads((tmp_path / "trimmed" / "config.json").read_text())
    assert config["vocab_size"] == 14
    assert config["eos_token_id"] == strings.index("<eos>")
    assert json.loads((tmp_path / "trimmed" / KEPT_IDS_FILE).read_text())["kept_ids"] == kept


def test_a_target_without_unk_gets_one_added_to_the_draft(tmp_path):
    """Byte-level BPE (SmolLM2-like, no unk): the draft's last id is an added <unk>, outside the
    intersection, and the target's context outside the kept set becomes it."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2)
    rows = sequences_of(tok, ["the cat sat on a mat", "what is two plus two? four."])
    response, prompt = count_tokens(rows, len(tok))
    kept = most_frequent_ids(response, prompt, 19, special_token_ids(tok))
    info = write_trimmed_draft(first_layers_model(model, 1), tok, kept, tmp_path / "d")
    assert info["added_unk"] and info["draft_vocab"] == 20
    saved = AutoTokenizer.from_pretrained(tmp_path / "d")
    assert saved.unk_token == ADDED_UNK and saved.unk_token_id == 19
    m = served_map_for(tok, len(tok), tmp_path / "d")
    assert m.intersection == 19 and not m.draft_mask[19]
    outside = [i for i in range(len(tok)) if i not in kept][0]
    assert m.to_draft(torch.tensor([outside])).tolist() == [19]


def test_a_trimmed_draft_is_a_pair_with_its_target_only(tmp_path):
    trimmed_gemma(tmp_path)
    report = check_pair(str(tmp_path / "target"), str(tmp_path / "trimmed"))
    assert report.ok, report.problems
    # the same draft against a target whose strings differ at the kept ids
    other = wordlevel({f"w{i}": i for i in range(40)} | {"<unk>": 40}, unk_token="<unk>")
    tiny_gemma3(len(other)).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    report = check_pair(str(tmp_path / "other"), str(tmp_path / "trimmed"))
    assert not report.ok and "trimmed from another target" in report.problems[0]


@pytest.mark.parametrize(
    "keep,message",
    [
        (len(WORDS) * 2 + 15, "trims nothing"),
        (4, "too small"),
    ],
)
def test_a_bad_keep_vocab_is_refused(keep, message):
    with pytest.raises(InputError, match=message):
        check_keep_vocab(keep, gemma_tokenizer())  # 39 tokens, 4 specials


def test_a_bad_keep_vocab_exits_2_before_any_stage_runs(tmp_path):
    tok = gemma_tokenizer()
    tiny_gemma3(len(tok)).save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    store = tmp_path / "store"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdraft",
            "run",
            f"target={tmp_path / 'target'}",
            "draft.from_target_layers=1",
            "draft.keep_vocab=100000",
            f"store={store}",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "draft.keep_vocab=100000" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in store.glob("*") if p.name != "logs"]  # no artifact


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("topk", [False, True], ids=["live-target", "stored-topk"])
def test_distilling_a_trimmed_draft_reads_mapped_context_and_the_restricted_target(tmp_path, topk):
    """KD of a trimmed draft: the first step's loss is KL(p‖q) over the kept ids, p the target's
    distribution restricted to them and renormalised, q the draft's on the target's context mapped
    as the server maps it (an id outside the set as its unk); training lowers it and moves the
    draft's weights. The target run live, or read from its stored top-k mapped into the draft's
    rows (k = V: the same loss)."""
    tok, _, kept, _ = trimmed_gemma(tmp_path, keep=10)
    target = load_causal_lm(tmp_path / "target")
    draft = load_causal_lm(tmp_path / "trimmed").train()
    torch.manual_seed(1)
    with torch.no_grad():  # away from the target it was cut from: something to learn
        for weight in draft.parameters():
            weight.add_(0.3 * torch.randn_like(weight))
    m = served_map_for(tok, len(tok), tmp_path / "trimmed")
    rows = sequences_of(tok, ["the cat sat on a mat", "the dog ran to the park"])
    assert any(i not in kept for row in rows for i in row["input_ids"])  # some context maps to unk
    assert {len(r["input_ids"]) for r in rows} == {6}
    check_distillation_through_the_map(
        target, draft, m, tok, rows, tmp_path / "train", steps=8, topk=topk
    )


def test_held_out_alpha_of_a_trimmed_draft_from_the_mapped_topk_equals_the_live_one(tmp_path):
    from served_kd import full_topk_store

    from specdraft.pipeline.stages.distil import BestAlphaCheckpoint

    tok, _, _, _ = trimmed_gemma(tmp_path, keep=10)
    target = load_causal_lm(tmp_path / "target")
    draft = load_causal_lm(tmp_path / "trimmed")
    m = served_map_for(tok, len(tok), tmp_path / "trimmed")
    rows = sequences_of(tok, ["the cat sat on a mat", "the dog ran to the park"])
    rows = [{**r, "row": i} for i, r in enumerate(rows)]
    stored = full_topk_store(target, rows, len(tok))
    common = dict(vocab=len(tok), vocab_map=m)
    live = BestAlphaCheckpoint(target, rows, 0, 1, 1.0, **common).alpha(draft)
    from_store = BestAlphaCheckpoint(None, rows, 0, 1, 1.0, target_outputs=stored, **common)
    assert 0 < live < 1
    assert from_store.alpha(draft) == pytest.approx(live, abs=1e-5)


# --------------------------------------------------------------------------- the job's wiring


def test_keep_vocab_adds_a_vocab_trim_stage_the_later_stages_read_as_the_draft_init():
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import build_stages

    job = load_job(None, ["target=/m/t", "draft.from_target_layers=2", "draft.keep_vocab=64"])
    stages = {s.name: s for s in build_stages(job)}
    assert stages["vocab_trim"].deps == ("target", "draft_init", "generate")
    assert stages["vocab_trim"].config.keep_vocab == 64
    for name in ("reference", "distil", "evaluate", "export", "report"):
        assert "draft_init=vocab_trim" in stages[name].deps, name
    # the draft init is the same for any K: its config (and so its key) does not hold K
    assert stages["draft_init"].config.keep_vocab == 0
    plain = {
        s.name: s
        for s in build_stages(load_job(None, ["target=/m/t", "draft.from_target_layers=2"]))
    }
    assert "vocab_trim" not in plain and stages["draft_init"].config == plain["draft_init"].config


@pytest.mark.parametrize(
    "override,message",
    [
        ("generate.draft_fraction=0.5", "does not sample them"),
        ("distil.divergence=ce", "distil.divergence=ce with draft.keep_vocab=64"),
    ],
)
def test_what_a_trimmed_draft_cannot_do_is_refused_by_the_config(override, message):
    from specdraft.pipeline.config import ConfigError, load_job

    with pytest.raises(ConfigError, match=message):
        load_job(
            None, ["target=/m/t", "draft.from_target_layers=2", "draft.keep_vocab=64", override]
        )


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_trimmed_drafts_card_says_how_vllm_serves_it(hybrid):
    from specdraft.pipeline.stages.export import model_card

    trimmed = {"kind": "trimmed", "rows": 32768, "target_rows": 262144, "hybrid": hybrid}
    card = model_card({"gamma": 3}, "b", "t", "d", 3, "m", "h", trimmed)
    assert '"use_heterogeneous_vocab": true' in card and "32768 of the target's 262144" in card
    assert ("disable_hybrid_kv_cache_manager=True" in card) == hybrid
    assert "STANDALONE" not in card  # SGLang refuses another vocabulary


@pytest.mark.integration
def test_the_toy_pipeline_trains_a_trimmed_draft_up_to_distil(tmp_path):
    """The tiny toy job with draft.keep_vocab: vocab_trim keeps K rows (an unk added: the toy
    tokenizer has none), and reference and both distil rounds train it and save it with its own
    vocabulary. (evaluate, export and report are left out here; the whole job with a trimmed
    draft runs in tests/test_serve_check.py, served by vLLM.)"""
    from conftest import TINY

    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import build_stages, check_store, execute_logged

    job = load_job(
        None,
        [*TINY, "generate.draft_fraction=0", "draft.keep_vocab=200", f"store={tmp_path / 's'}"],
    )
    check_store(job, create=True)
    stages = [s for s in build_stages(job) if s.name not in ("evaluate", "export", "report")]
    results = execute_logged(stages, job, force=set(), use_ray=False)
    trim = results["vocab_trim"]
    assert trim.manifest["info"]["draft_vocab"] == 200 and trim.manifest["info"]["added_unk"]
    kept = json.loads((trim.path / "model" / KEPT_IDS_FILE).read_text())["kept_ids"]
    assert len(kept) == 199
    for name in ("reference", "distil", "distil_r2"):
        model_dir = results[name].path / "model"
        assert json.loads((model_dir / KEPT_IDS_FILE).read_text())["kept_ids"] == kept, name
        assert len(AutoTokenizer.from_pretrained(model_dir)) == 200
        assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 200


def test_a_trimmed_draft_is_judged_and_decoded_in_the_engines_view(tmp_path):
    """ServedDraft: target ids in, logits over the target's ids out (-inf outside the kept set);
    greedy speculative decoding with it is lossless, its drafts are the masked argmax mapped back,
    and the acceptance under each rule is computed over those logits."""
    from specdraft.drafts.vocab_map import ServedDraft
    from specdraft.drafts.vocab_trim import served_view
    from specdraft.pipeline.batches import Collator
    from specdraft.pipeline.decoding import autoregressive_generate, speculative_generate
    from specdraft.pipeline.evaluation import position_acceptance

    tok, draft, kept, _ = trimmed_gemma(tmp_path)
    target = load_causal_lm(tmp_path / "target")
    trimmed = load_causal_lm(tmp_path / "trimmed")
    served = served_view(trimmed, tmp_path / "trimmed", tok, target)
    assert isinstance(served, ServedDraft)
    assert served_view(draft, tmp_path / "target", tok, target) is draft  # same vocabulary
    m = served.vmap
    ids = torch.tensor([tok("the cat sat on the mat").input_ids])
    with torch.no_grad():
        logits = served(input_ids=ids).logits[0]  # (T, V_target)
        small = trimmed(m.to_draft(ids)).logits[0]
    drafts, targets = m.intersection_rows()
    assert logits.shape[-1] == target.config.vocab_size
    torch.testing.assert_close(logits[:, targets], small[:, drafts])
    outside = torch.ones(logits.shape[-1], dtype=torch.bool)
    outside[targets] = False
    assert torch.isinf(logits[:, outside]).all()
    assert logits.argmax(-1).tolist() == m.greedy_draft(small).tolist()

    prompt = torch.tensor([tok("the cat").input_ids])
    reference = autoregressive_generate(target, prompt, max_new_tokens=12)
    out, stats = speculative_generate(target, served, prompt, gamma=3, max_new_tokens=12)
    assert out.tolist() == reference.tolist() and stats.drafted > 0  # lossless through the map

    sequence = {
        "input_ids": prompt[0].tolist() + reference.tolist(),
        "response_mask": [0] * prompt.shape[1] + [1] * len(reference),
    }
    batch = Collator(0)([sequence])
    got = position_acceptance(target, served, batch, 1.0)
    with torch.no_grad():
        t = target(batch["input_ids"]).logits[0, prompt.shape[1] - 1 : -1].float()
        d = served(input_ids=batch["input_ids"]).logits[0, prompt.shape[1] - 1 : -1].float()
    p, q = t.softmax(-1), d.softmax(-1)
    torch.testing.assert_close(got.probabilistic, torch.minimum(p, q).sum(-1))
    torch.testing.assert_close(got.greedy_drafting, p.gather(-1, d.argmax(-1, True)).squeeze(-1))
    assert got.agreement.tolist() == (d.argmax(-1) == t.argmax(-1)).float().tolist()
