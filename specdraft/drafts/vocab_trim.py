"""Vocabulary-trimmed drafts (VocabTrim, arXiv 2506.22694): a draft whose embedding and LM head
hold rows for K of the target's token ids only, the K most frequent in the job's target-written
sequences plus the special tokens it needs. Its head costs K/V of the full one, which is most of a
shallow draft's step when V is large (Gemma-3: 262 144 rows).

The draft's tokenizer is a `tokenizers` WordLevel model whose vocabulary is exactly the kept
token strings (draft id i is the target's kept_ids[i]), so a serving engine maps it to the target
by token string (`use_heterogeneous_vocab`, drafts/vocab_map.py). A target without an unk token
gets one added to the draft (its last id, a string the target lacks): the token the target's
context becomes outside the kept set. `kept_ids.json` beside the weights records the set.

A draft with another tokenizer (draft.vocabulary=intersection: SmolLM2 for a Gemma-3 target) is
served the same way, through the intersection of the two vocabularies; `vocabulary.json` beside
its weights marks it. The functions from `has_own_vocabulary` on serve both kinds: a draft with its
own vocabulary is trained, judged and exported through the VocabularyMap a server builds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from specdraft.drafts.models import TOKENIZER_FILES
from specdraft.errors import InputError

KEPT_IDS_FILE = "kept_ids.json"
INTERSECTION_FILE = "vocabulary.json"  # marks a draft with another tokenizer (its own, whole)
ADDED_UNK = "<unk>"


def special_token_ids(tokenizer) -> list[int]:
    """The target's bos, eos, pad and unk ids that it has, each once, in that order."""
    ids: list[int] = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def needs_added_unk(tokenizer) -> bool:
    return getattr(tokenizer, "unk_token_id", None) is None


def check_keep_vocab(keep: int, tokenizer, what: str = "the target") -> None:
    """InputError unless `keep` rows can hold the special tokens and one more and trim something:
    at least len(specials) + 1 (+ 1 for an added unk), below the tokenizer's length."""
    vocab = len(tokenizer)
    specials = special_token_ids(tokenizer)
    least = len(specials) + 1 + needs_added_unk(tokenizer)
    if keep >= vocab:
        raise InputError(
            f"draft.keep_vocab={keep}: {what}'s vocabulary has {vocab} tokens, so keeping {keep} "
            f"trims nothing; give a count below {vocab}, or 0 to keep the whole vocabulary"
        )
    if keep < least:
        names = tokenizer.convert_ids_to_tokens(specials)
        unk = " and an added unk" if needs_added_unk(tokenizer) else ""
        raise InputError(
            f"draft.keep_vocab={keep} is too small: the draft needs {what}'s special tokens "
            f"{names}{unk} and at least one other token; give at least {least}"
        )


def count_tokens(sequences, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(response counts (V,), prompt counts (V,)) of the token ids in `sequences` (rows with
    `input_ids` and `response_mask`, as the generate stage writes them)."""
    response = torch.zeros(vocab, dtype=torch.long)
    prompt = torch.zeros(vocab, dtype=torch.long)
    for row in sequences:
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)  # (T,)
        answer = torch.as_tensor(row["response_mask"], dtype=torch.bool)  # (T,)
        response += torch.bincount(ids[answer], minlength=vocab)[:vocab]
        prompt += torch.bincount(ids[~answer], minlength=vocab)[:vocab]
    return response, prompt


def most_frequent_ids(
    response_counts: torch.Tensor, prompt_counts: torch.Tensor, keep: int, specials: list[int]
) -> list[int]:
    """The `keep` ids a trimmed draft holds, ascending: `specials`, then the ids most frequent in
    the target's responses (what the draft will propose), ties broken by their count in the
    prompts, then by the smaller id (ids never seen fill what is left in id order)."""
    # one integer key: the response count first, the prompt count second
    key = response_counts * (int(prompt_counts.max()) + 1) + prompt_counts  # (V,)
    order = torch.sort(key, descending=True, stable=True).indices.tolist()  # equal keys: id order
    kept = list(dict.fromkeys([*specials, *order]))[:keep]
    return sorted(kept)


def trim_model(model, kept_ids: list[int], *, added_unk: bool, draft_specials: dict[str, int]):
    """A copy of `model` whose input embedding and LM head hold the rows of `kept_ids` (in that
    order; draft id i is target id kept_ids[i]), and with `added_unk` one more row last: the mean
    of the rows left out (the draft's unk stands for all of them). `draft_specials` sets the
    config's bos/eos/pad ids ({"bos_token_id": ...}) to the draft's."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    rows = len(kept_ids) + int(added_unk)
    kept = torch.tensor(kept_ids, dtype=torch.long)
    dropped = torch.ones(text.vocab_size, dtype=torch.bool)
    dropped[kept] = False
    vocabulary_weights = {
        model.get_input_embeddings().weight.data_ptr(),
        model.get_output_embeddings().weight.data_ptr(),
    }
    state = {}
    for name, value in model.state_dict().items():
        if value.data_ptr() in vocabulary_weights and value.shape[0] == text.vocab_size:
            parts = [value[kept]]  # (K, H)
            if added_unk:
                parts.append(value[dropped].mean(dim=0, keepdim=True))  # (1, H)
            value = torch.cat(parts)
        state[name] = value.clone()
    text.vocab_size = rows
    for key, token_id in draft_specials.items():
        setattr(text, key, token_id)
        if text is not config:
            setattr(config, key, token_id)
    trimmed = type(model)(config)
    trimmed.load_state_dict(state, strict=True)
    trimmed.generation_config = copy.deepcopy(model.generation_config)
    for key, token_id in draft_specials.items():
        setattr(trimmed.generation_config, key, token_id)
    return trimmed.to(next(model.parameters()).dtype).eval()


def wordlevel_tokenizer(target_tokenizer, kept_ids: list[int], *, added_unk: bool):
    """The trimmed draft's tokenizer: a WordLevel model over exactly the kept token strings (id i
    is kept_ids[i]'s string; with `added_unk`, ADDED_UNK last), with the target's special tokens
    mapped to their draft ids. It does not segment text (a serving engine maps ids, never text);
    its vocabulary and special ids are what the engine reads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    strings = target_tokenizer.convert_ids_to_tokens(kept_ids)
    if added_unk:
        unk = ADDED_UNK
        while unk in target_tokenizer.get_vocab():  # a string the target does not have
            unk = f"<{unk}>"
        strings.append(unk)
    else:
        unk = target_tokenizer.unk_token
    vocab = {token: i for i, token in enumerate(strings)}
    if len(vocab) != len(strings):
        raise ValueError("the kept token strings are not distinct")
    specials = {}
    for name in ("bos_token", "eos_token", "pad_token"):
        token = getattr(target_tokenizer, name, None)
        if token is not None and token in vocab:
            specials[name] = token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=unk)), unk_token=unk, **specials
    )
    return tokenizer


def draft_special_ids(tokenizer) -> dict[str, int]:
    """{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...} of the draft tokenizer."""
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            ids[name] = int(token_id)
    return ids


def write_trimmed_draft(model, target_tokenizer, kept_ids: list[int], dst: Path) -> dict:
    """Save `model` (the draft init) trimmed to `kept_ids`, with its WordLevel tokenizer and
    KEPT_IDS_FILE, into `dst` (a stage's output, published whole). Returns what the stage's
    manifest records."""
    from specdraft.drafts.models import count_parameters

    added_unk = needs_added_unk(target_tokenizer)
    tokenizer = wordlevel_tokenizer(target_tokenizer, kept_ids, added_unk=added_unk)
    trimmed = trim_model(
        model, kept_ids, added_unk=added_unk, draft_specials=draft_special_ids(tokenizer)
    )
    dst.mkdir(parents=True, exist_ok=True)
    trimmed.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)
    record = {"kept_ids": kept_ids, "added_unk": tokenizer.unk_token if added_unk else None}
    (dst / KEPT_IDS_FILE).write_text(json.dumps(record))
    return {
        "draft_vocab": len(tokenizer),
        "added_unk": added_unk,
        "parameters": count_parameters(trimmed),
        "untrimmed_parameters": count_parameters(model),
    }


def is_trimmed(model_dir: str | Path) -> bool:
    """Whether the model directory holds a vocabulary-trimmed draft (its KEPT_IDS_FILE)."""
    return (Path(model_dir) / KEPT_IDS_FILE).is_file()


def kept_ids(model_dir: str | Path) -> list[int]:
    return json.loads((Path(model_dir) / KEPT_IDS_FILE).read_text())["kept_ids"]


def is_intersection(model_dir: str | Path) -> bool:
    """Whether the model directory holds a draft with another tokenizer, served through the
    intersection of the vocabularies (its INTERSECTION_FILE, written by the draft_init stage)."""
    return (Path(model_dir) / INTERSECTION_FILE).is_file()


def mark_intersection(model_dir: Path, source: str) -> None:
    """Mark the draft saved in `model_dir` (from `source`) as served through the intersection."""
    record = {"vocabulary": "intersection", "source": source}
    (Path(model_dir) / INTERSECTION_FILE).write_text(json.dumps(record))


def has_own_vocabulary(model_dir: str | Path) -> bool:
    """Whether the draft in `model_dir` has a vocabulary of its own, mapped to the target's by
    token string when served: trimmed (VocabTrim) or another tokenizer (intersection)."""
    return Path(model_dir).is_dir() and (is_trimmed(model_dir) or is_intersection(model_dir))


# What a draft with its own vocabulary holds besides its weights and config: its markers and
# tokenizer files, copied along by every stage that saves it again (reference, distil) and by
# the export.
DRAFT_VOCABULARY_FILES = (KEPT_IDS_FILE, INTERSECTION_FILE, *TOKENIZER_FILES)


def copy_draft_vocabulary(src: str | Path, dst: Path) -> list[str]:
    """Copy a draft's own tokenizer and marker files byte for byte from `src` to `dst`."""
    import shutil

    copied = []
    for name in DRAFT_VOCABULARY_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def served_map_for(
    target_tokenizer, target_rows: int, draft_dir: str | Path, draft_rows: int | None = None
):
    """The VocabularyMap between the target and the draft in `draft_dir` (one with its own
    vocabulary; a GGUF file too, given its `draft_rows`), from the draft's own tokenizer and
    config (its vocab_size, or `draft_rows`), as a serving engine builds it."""
    from transformers import AutoConfig

    from specdraft.drafts.models import load_tokenizer
    from specdraft.drafts.vocab_map import served_vocabulary_map

    if draft_rows is None:
        draft_rows = AutoConfig.from_pretrained(str(draft_dir)).get_text_config().vocab_size
    draft_tokenizer = load_tokenizer(draft_dir)
    return served_vocabulary_map(target_tokenizer, draft_tokenizer, target_rows, draft_rows)


def draft_vocabulary_map(draft_dir: str | Path, target_tokenizer, target_head):
    """The VocabularyMap a draft with its own vocabulary (trimmed or another tokenizer) in
    `draft_dir` is trained and judged through, or None for a draft with the target's vocabulary.
    `target_head` is the target model or its (V, H) LM head: its rows are the target's
    vocab_size, as the server counts them."""
    if not has_own_vocabulary(draft_dir):
        return None
    if not isinstance(target_head, torch.Tensor):
        target_head = target_head.get_output_embeddings().weight
    return served_map_for(target_tokenizer, target_head.shape[0], draft_dir)


def save_draft_vocabulary(draft_dir: str | Path, target_tokenizer, dst: Path) -> None:
    """The tokenizer of a draft saved again (reference, distil): a draft's own files (trimmed or
    another tokenizer), copied byte for byte from `draft_dir`, else the target's."""
    if has_own_vocabulary(draft_dir):
        copy_draft_vocabulary(draft_dir, dst)
    else:
        target_tokenizer.save_pretrained(dst)


def served_view(draft, draft_dir: str | Path, target_tokenizer, target, *, mapped: bool = False):
    """The draft as a serving engine runs it beside `target`: a draft with its own vocabulary
    (marked so in `draft_dir`, or any draft with `mapped`: one with another tokenizer given as it
    is, a GGUF file included) wrapped in a ServedDraft (target ids in, logits over the target's
    ids out), any other draft as it is."""
    from specdraft.drafts.vocab_map import ServedDraft

    if not (mapped or has_own_vocabulary(draft_dir)):
        return draft
    rows = target.get_output_embeddings().weight.shape[0]
    draft_rows = draft.config.get_text_config().vocab_size
    return ServedDraft(draft, served_map_for(target_tokenizer, rows, draft_dir, draft_rows), rows)
