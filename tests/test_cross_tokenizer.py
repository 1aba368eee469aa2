"""Cross-tokenizer drafts (draft.vocabulary=intersection): a draft with its own tokenizer, served
through the token strings both vocabularies hold as vLLM's use_heterogeneous_vocab serves it. A
tiny pair built here: a SentencePiece-style target (▁ space marker, Gemma's special tokens) and a
byte-level-style draft (Ġ space marker, <bos> and <unk> shared, words of its own) with more rows
than the target."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from specdraft.drafts.models import load_causal_lm
from specdraft.drafts.pair import check_pair, require_pair
from specdraft.drafts.vocab_map import ServedDraft, served_vocabulary_map, space_prefixes
from specdraft.drafts.vocab_trim import INTERSECTION_FILE, mark_intersection, served_view
from specdraft.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import tiny_llama  # noqa: E402
from served_kd import check_distillation_through_the_map  # noqa: E402
from tiny_gemma import gemma_wordlevel_tokenizer, tiny_gemma3  # noqa: E402
from vllm_mapping import needs_vllm, vllm_tables  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "park", "sun", "rain"]
LETTERS = list("bcdefghijk")  # single letters the words do not hold as whole tokens
FOREIGN = ["zebra", "quokka", "llama", "otter", "heron", "moose", "yak", "ibis"]  # draft only
TARGET_ONLY = ["bird", "fish"]
G, S = "\u0120", "\u2581"  # Ġ (byte-level BPE), ▁ (SentencePiece)


def target_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, ▁, then ▁ words, words and letters."""
    return gemma_wordlevel_tokenizer(WORDS + TARGET_ONLY, WORDS + LETTERS)


def draft_tokenizer(foreign: int = len(FOREIGN)) -> PreTrainedTokenizerFast:
    """SmolLM2's kind: <|endoftext|> its eos, Ġ-marked words; <unk> and <bos> as the target's,
    and `foreign` words (each as Ġword and word) the target lacks, before the shared ones."""
    strings = ["<|endoftext|>", "<unk>", "<bos>"]
    strings += [x for w in FOREIGN[:foreign] for x in (G + w, w)]
    strings += [G, *(G + w for w in WORDS), *WORDS, *LETTERS]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(strings)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


SHARED = 2 + 1 + 2 * len(WORDS) + len(LETTERS)  # <unk>, <bos>, the bare marker, words, letters


def save_pair(root: Path, foreign: int = len(FOREIGN)) -> tuple[Path, Path]:
    """A 3-layer Gemma-3 target and a 1-layer Llama draft with their tokenizers, in `root`."""
    target_tok, draft_tok = target_tokenizer(), draft_tokenizer(foreign)
    tiny_gemma3(len(target_tok)).save_pretrained(root / "target")
    target_tok.save_pretrained(root / "target")
    tiny_llama(len(draft_tok), layers=1, seed=1).save_pretrained(root / "draft")
    draft_tok.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def normalised(vocab: dict[str, int], marker: str) -> dict[str, int]:
    """The rule written out once more, by hand: a leading space marker read as a space."""
    out: dict[str, int] = {}
    for token, i in vocab.items():
        out.setdefault(" " + token[1:] if token.startswith(marker) else token, i)
    return out


# --------------------------------------------------------------------------- the mapping


def test_the_pairs_mapping_is_vllms_rule():
    """Each side's marker is probed from " a" (▁ for the target, Ġ for the draft); ids meet by
    normalised string, specials by their string (<bos>, <unk>; the target's <eos> and <pad> and
    the draft's <|endoftext|> stay out); what is outside becomes the other side's unk."""
    target, draft = target_tokenizer(), draft_tokenizer()
    assert space_prefixes(target) == (S,) and space_prefixes(draft) == (G,)
    m = served_vocabulary_map(target, draft, len(target), len(draft))
    t, d = normalised(target.get_vocab(), S), normalised(draft.get_vocab(), G)
    expected = {t[s]: d[s] for s in t.keys() & d.keys()}
    assert {i: int(j) for i, j in enumerate(m.target_to_draft) if j >= 0} == expected
    assert m.intersection == SHARED == len(expected)
    tv, dv = target.get_vocab(), draft.get_vocab()
    assert m.target_to_draft[tv[S + "cat"]] == dv[G + "cat"]
    assert m.target_to_draft[tv["<bos>"]] == dv["<bos>"]
    assert m.target_to_draft[tv[S]] == dv[G]  # the bare markers are one space each
    assert m.draft_fallback_id == dv["<unk>"] and m.target_fallback_id == tv["<unk>"]
    context = torch.tensor([tv["<bos>"], tv[S + "the"], tv["<eos>"], tv["<pad>"]])
    assert m.to_draft(context).tolist() == [dv["<bos>"], dv[G + "the"], dv["<unk>"], dv["<unk>"]]
    assert m.to_target(torch.tensor([dv[G + "zebra"], dv["mat"]])).tolist() == [
        tv["<unk>"],
        tv["mat"],
    ]


@pytest.mark.integration
@needs_vllm
def test_the_pairs_mapping_equals_vllms_own(tmp_path):
    """vLLM's VocabMapping (the installed engine's) gives our tables on the saved pair."""
    target, draft = save_pair(tmp_path)
    ours = served_vocabulary_map(
        AutoTokenizer.from_pretrained(target),
        AutoTokenizer.from_pretrained(draft),
        len(target_tokenizer()),
        len(draft_tokenizer()),
    )
    theirs = vllm_tables(target, draft, len(target_tokenizer()), len(draft_tokenizer()))
    assert theirs == [ours.target_to_draft.tolist(), ours.draft_to_target.tolist()]


def test_coverage_counts_the_target_tokens_inside_the_intersection():
    target, draft = target_tokenizer(), draft_tokenizer()
    m = served_vocabulary_map(target, draft, len(target), len(draft))
    counts = torch.zeros(len(target), dtype=torch.long)
    counts[target.get_vocab()[S + "cat"]] = 3  # inside
    counts[target.get_vocab()["<eos>"]] = 1  # outside
    assert m.coverage(counts) == pytest.approx(0.75)


# --------------------------------------------------------------------------- the pair check


def test_another_tokenizer_is_refused_unless_the_job_opts_in(tmp_path):
    target, draft = save_pair(tmp_path)
    refused = check_pair(str(target), str(draft))
    assert not refused.ok and "opt in with draft.vocabulary=intersection" in refused.remedy
    with pytest.raises(InputError, match="draft.vocabulary=intersection"):
        require_pair(str(target), str(draft))
    report = check_pair(str(target), str(draft), vocabulary="intersection")
    assert report.ok, report.problems
    assert report.vocabulary == "intersection" and report.vocabulary_map.intersection == SHARED
    draft_share, target_share = SHARED / len(draft_tokenizer()), SHARED / len(target_tokenizer())
    assert (
        f"intersection: {SHARED} token strings, {draft_share:.1%} of the draft's "
        f"{len(draft_tokenizer())} tokens and {target_share:.1%} of the target's" in report.notes[0]
    )


def test_an_intersection_below_the_floor_is_refused(tmp_path):
    target, draft = save_pair(tmp_path)
    share = SHARED / len(draft_tokenizer())
    report = check_pair(
        str(target), str(draft), vocabulary="intersection", min_intersection=share + 0.01
    )
    assert len(report.problems) == 1 and "below draft.min_intersection" in report.problems[0]
    assert check_pair(str(target), str(draft), vocabulary="intersection", min_intersection=share).ok


def test_check_pair_reports_the_intersection_and_its_coverage_of_a_text(tmp_path, capsys):
    from specdraft.cli import main

    target, draft = save_pair(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on a mat\n\nthe bird sat\n")  # ▁bird: the target's only
    assert main(["check-pair", str(target), str(draft)]) == 2
    assert "--vocabulary intersection" in capsys.readouterr().out
    assert main(["check-pair", str(target), str(draft), "--vocabulary", "intersection"]) == 0
    out = capsys.readouterr().out
    assert f"intersection: {SHARED} token strings" in out and "OK: the draft" in out
    argv = ["check-pair", str(target), str(draft), "--vocabulary", "intersection"]
    assert main([*argv, "--text", str(text)]) == 0
    assert "covers 88.9% of the target's 9 tokens" in capsys.readouterr().out  # 8 of 9
    assert main([*argv, "--min-intersection", "0.99"]) == 2
    assert "below draft.min_intersection=0.99" in capsys.readouterr().out


# --------------------------------------------------------------------------- the job's settings


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["draft.from_target_layers=1"], "has the target's tokenizer"),
        (["draft=/m/d", "draft.keep_vocab=16"], "set one of them"),
        (["draft=/m/d", "distil.divergence=ce"], "distil.divergence=ce with draft.vocabulary"),
        (["draft=/m/d", "generate.draft_fraction=0.5"], "samples in its own tokens"),
    ],
)
def test_what_a_cross_tokenizer_draft_cannot_do_is_refused_by_the_config(overrides, message):
    from specdraft.pipeline.config import ConfigError, load_job

    with pytest.raises(ConfigError, match=message):
        load_job(None, ["target=/m/t", "draft.vocabulary=intersection", *overrides])


def test_the_floor_is_not_in_the_draft_inits_key_and_the_opt_in_is():
    """draft.min_intersection is checked before any stage runs: the draft saved is the same for
    any floor, so its stage (and everything after it) keeps its key; the opt-in changes what
    draft_init writes (a copy with its mark), so it is keyed."""
    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import build_stages

    def draft_init(*overrides):
        job = load_job(None, ["target=/m/t", "draft=/m/d", *overrides])
        return next(s for s in build_stages(job) if s.name == "draft_init").config

    opted = draft_init("draft.vocabulary=intersection")
    assert draft_init("draft.vocabulary=intersection", "draft.min_intersection=0.8") == opted
    assert draft_init() != opted and opted.vocabulary == "intersection"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "opt in with draft.vocabulary=intersection"),
        (
            ["draft.vocabulary=intersection", "draft.min_intersection=0.9"],
            "below draft.min_intersection=0.9",
        ),
    ],
)
def test_a_run_stops_with_one_message_and_writes_nothing(tmp_path, capsys, overrides, message):
    from specdraft.cli import main

    target, draft = save_pair(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": "the cat", "response": "sat"}) + "\n" for _ in range(8))
    )
    store, out = tmp_path / "store", tmp_path / "out"
    argv = ["run", f"target={target}", f"draft={draft}", f"data={data}", f"store={store}"]
    assert main([*argv, *overrides, "--out", str(out), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert not store.exists() or not [p for p in store.iterdir() if p.name != "logs"]


# --------------------------------------------------------------------------- training, decoding


@pytest.mark.parametrize("topk", [False, True], ids=["live-target", "stored-topk"])
def test_distilling_a_cross_tokenizer_draft_reads_mapped_context_and_the_intersection(
    tmp_path, topk
):
    """KD of a draft with another tokenizer and more rows than the target: the first step's loss
    is KL(p‖q) over the intersection, p the target's distribution restricted to it and
    renormalised, q the draft's on the target's context mapped as vLLM maps it; training lowers
    it and moves the draft's weights."""
    target_dir, draft_dir = save_pair(tmp_path)
    tok = target_tokenizer()
    target, draft = load_causal_lm(target_dir), load_causal_lm(draft_dir).train()
    m = served_vocabulary_map(tok, draft_tokenizer(), len(tok), len(draft_tokenizer()))
    assert int(m.intersection_rows()[0].max()) >= len(tok)  # draft ids past the target's rows
    texts = ["<bos> the cat sat on a mat", "<bos> the dog ran to the park"]
    mask = [i >= 3 for i in range(7)]
    rows = [{"input_ids": tok(t).input_ids, "response_mask": mask} for t in texts]
    assert all(len(r["input_ids"]) == 7 for r in rows)
    check_distillation_through_the_map(
        target, draft, m, tok, rows, tmp_path / "train", steps=6, topk=topk
    )


def test_a_marked_draft_decodes_losslessly_in_the_served_view(tmp_path):
    """served_view wraps a draft marked as another tokenizer's; greedy speculative decoding
    through it gives the target's own tokens, and its drafts are the masked argmax mapped back."""
    from specdraft.pipeline.decoding import autoregressive_generate, speculative_generate

    target_dir, draft_dir = save_pair(tmp_path)
    tok = target_tokenizer()
    target, draft = load_causal_lm(target_dir), load_causal_lm(draft_dir)
    assert served_view(draft, draft_dir, tok, target) is draft  # unmarked: as it is
    mark_intersection(draft_dir, "a test")
    served = served_view(draft, draft_dir, tok, target)
    assert isinstance(served, ServedDraft)
    ids = torch.tensor([tok("the cat sat on the mat").input_ids])
    with torch.no_grad():
        logits = served(input_ids=ids).logits[0]  # (T, V_target)
        own = draft(served.vmap.to_draft(ids)).logits[0]  # (T, V_draft)
    assert logits.argmax(-1).tolist() == served.vmap.greedy_draft(own).tolist()
    prompt = torch.tensor([tok("<bos> the cat").input_ids])
    reference = autoregressive_generate(target, prompt, max_new_tokens=12)
    out, stats = speculative_generate(target, served, prompt, gamma=3, max_new_tokens=12)
    assert out.tolist() == reference.tolist() and stats.drafted > 0


def test_draft_init_saves_a_gguf_draft_with_its_own_tokenizer_and_mark(tmp_path):
    """A GGUF draft (byte-level BPE, no unk: vLLM's fallback is its eos) is dequantised into the
    stage's model/ with its tokenizer and the mark, and maps to the target by token string."""
    from gguf_tiny import tiny_tokenizer, write_gguf

    from specdraft.pipeline.config import DraftConfig
    from specdraft.pipeline.engine.artifacts import StageContext
    from specdraft.pipeline.stages import draft_init

    gguf_tok = tiny_tokenizer()
    path = write_gguf(tiny_llama(len(gguf_tok), layers=1), gguf_tok, tmp_path / "d.gguf")
    cfg = DraftConfig(model=str(path), vocabulary="intersection")
    info = draft_init.run(cfg, {}, StageContext(out=tmp_path / "out", seed=0))
    saved = tmp_path / "out" / "model"
    assert info["model"] == "model" and info["vocabulary"] == "intersection"
    assert json.loads((saved / INTERSECTION_FILE).read_text())["source"] == str(path)
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == gguf_tok.get_vocab()
    tok = target_tokenizer()
    m = served_view(load_causal_lm(saved), saved, tok, tiny_gemma3(len(tok))).vmap
    assert m.draft_fallback_id == gguf_tok.eos_token_id
    the = tok.get_vocab()[S + "the"]
    assert m.target_to_draft[the] == gguf_tok.get_vocab()[G + "the"]


def test_eval_judges_a_cross_tokenizer_draft_only_when_told(tmp_path, capsys):
    """`specdraft eval` refuses a draft with another tokenizer as the run does (naming the
    option); with --vocabulary intersection it judges it in the served view, losslessly."""
    from specdraft.cli import main

    target, draft = save_pair(tmp_path)
    data = tmp_path / "prompts.jsonl"
    prompts = ["the cat sat", "the dog ran to", "a sun on the park"]
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    argv = ["eval", "--target", str(target), "--draft", str(draft), "--data", str(data)]
    # one prompt a batch: padded batches of this window-4 target are not decoded losslessly even
    # with a draft of its own vocabulary (a defect of the batched decoder, reported apart)
    argv += ["--max-new-tokens=8", "--gamma=3", "--device=cpu", "--batch-size=1"]
    assert main(argv) == 2
    assert "--vocabulary intersection" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert main([*argv, "--vocabulary", "intersection", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["lossless_greedy"] is True and metrics["num_spec_prompts"] == 3
    assert 0 <= metrics["alpha_greedy"] <= 1


# --------------------------------------------------------------------------- a whole job


@pytest.mark.integration
def test_a_job_distils_evaluates_and_exports_a_cross_tokenizer_draft(tmp_path):
    """`specdraft run` with a draft of another tokenizer: draft_init saves it with its own
    tokenizer and mark, distil trains it over the intersection (recording the share of the
    responses' target tokens it holds), evaluation decodes losslessly in the served view, and
    the export keeps the draft's own tokenizer and rows, its card saying how vLLM serves it."""
    from conftest import SMALL_PAIR

    from specdraft.pipeline.config import load_job
    from specdraft.pipeline.engine.job import run_job

    target, draft = save_pair(tmp_path)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        picks = torch.randint(0, len(WORDS), (5,), generator=g).tolist()
        question, answer = " ".join(WORDS[j] for j in picks), WORDS[picks[0]]
        rows.append({"question": question, "answer": answer, "category": f"c{i % 2}"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = [f"target={target}", f"draft={draft}", "draft.vocabulary=intersection"]
    job = load_job(None, [*models, f"data={data}", *SMALL_PAIR, f"store={tmp_path / 's'}"])
    out = tmp_path / "out"
    results = run_job(job, out, use_ray=False)

    draft_tokenizer_json = (draft / "tokenizer.json").read_bytes()
    init = results["draft_init"].path / "model"
    assert (init / INTERSECTION_FILE).is_file()
    assert (init / "tokenizer.json").read_bytes() == draft_tokenizer_json
    info = results["distil"].manifest["info"]
    assert info["intersection"] == SHARED and 0 < info["intersection_coverage"] <= 1
    for name in ("reference", "distil"):
        saved = results[name].path / "model"
        assert (saved / "tokenizer.json").read_bytes() == draft_tokenizer_json, name
        assert (saved / INTERSECTION_FILE).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lossless_greedy"] is True and metrics["final"]["lossless_greedy"] is True
    exported = out / "draft"
    assert (exported / "tokenizer.json").read_bytes() == draft_tokenizer_json
    assert AutoTokenizer.from_pretrained(exported).get_vocab() == draft_tokenizer().get_vocab()
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == len(draft_tokenizer())  # its own rows, not the target's
    card = (exported / "README.md").read_text()
    assert '"use_heterogeneous_vocab": true' in card and "disable_hybrid_kv_cache_manager" in card
    assert f"{SHARED} of its {len(draft_tokenizer())} tokens" in card and "STANDALONE" not in card
    # the export is recognised as a cross-tokenizer draft without the opt-in
    report = check_pair(str(target), str(exported))
    assert report.ok and report.vocabulary == "intersection", report.problems
