"""Check that a draft can serve a target before anything trains.

Serving stacks (vLLM, SGLang, TensorRT-LLM, HF assisted generation) feed the target's token ids to the
draft and its logits back to the target, so the two must share one tokenizer (same size is not
enough). Embedding sizes may differ in padding past the tokenizer's ids (Qwen2.5-7B has 152 064
rows, Qwen2.5-0.5B 151 936 over one 151 665-token tokenizer): specdraft compares logits over the
tokenizer's ids only, and the export pads the draft to the target's vocab_size, which vLLM
requires. Configs and tokenizers are loaded; of a local model's weights only the safetensors
headers and a few bytes per tensor are read (every file its index names there, holding what its
header says, the embedding's rows fitting the config, not zeroed), never the tensors.

A draft with another tokenizer is a pair only when the caller opts in (`vocabulary="intersection"`:
the job's draft.vocabulary, check-pair's --vocabulary): vLLM then serves it through the token
strings both vocabularies hold (drafts/vocab_map.py), and the pair check asks that they make at
least `min_intersection` of the draft's vocabulary.

Model code shipped in a checkpoint (`auto_map`) runs per model (ModelTrust): trusting the target
never runs code that came with the draft.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from specdraft.drafts.vocab_map import VocabularyMap, served_vocabulary_map
from specdraft.drafts.vocab_trim import is_intersection, is_trimmed, kept_ids
from specdraft.errors import InputError

# How many concrete differences one check reports before it summarises the rest.
MAX_EXAMPLES = 3


class PairError(InputError):
    """A target or draft that cannot be loaded; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class ModelTrust:
    """Whose model code (a checkpoint's `auto_map` modules) may run: the target's (its tokenizer is
    the pair's) and the draft's (the draft folder, and every draft trained from it). Each model's
    own setting; never an artifact's record of it (a manifest is writable by anyone who can write
    the store)."""

    target: bool = False
    draft: bool = False

    @classmethod
    def of(cls, value: bool | str | ModelTrust) -> ModelTrust:
        """A command line's setting: True or "both" (one flag for the two models named on it),
        "target" or "draft" (that one only), False or "none"."""
        if isinstance(value, ModelTrust):
            return value
        if value in (True, "both"):
            return cls(True, True)
        if value in (False, None, "", "none"):
            return cls()
        if value in ("target", "draft"):
            return cls(target=value == "target", draft=value == "draft")
        raise InputError(f"--trust-remote-code {value!r}: give target, draft or both")

    @classmethod
    def for_job(cls, target: bool, draft: bool, from_target_layers: int = 0) -> ModelTrust:
        """A job's `target.trust_remote_code` and `draft.trust_remote_code`. A draft cut from the
        target's layers is the target's code and nothing else, so it is trusted as the target is."""
        return cls(target, target if from_target_layers else draft)

    def of_input(self, name: str) -> bool:
        """The setting for a stage's model input `name`: the target's for `target`, the draft's
        for the drafts (draft_init, reference, distil)."""
        return self.target if name == "target" else self.draft


UNTRUSTED = ModelTrust()  # no model's code runs: the default everywhere


@dataclass
class PairReport:
    problems: list[str] = field(default_factory=list)  # what differs, concretely; empty when ok
    notes: list[str] = field(default_factory=list)  # informational lines for a printed summary
    # positions both models cover (the smaller max_position_embeddings; inf where none is given)
    context: float = math.inf
    # how the draft's vocabulary meets the target's: same, trimmed or intersection
    vocabulary: str = "same"
    vocabulary_map: VocabularyMap | None = None  # an intersection draft's, as a server maps it
    remedy: str = ""  # the one setting that makes the problems go, when there is one

    @property
    def ok(self) -> bool:
        return not self.problems


def check_pair(
    target: str,
    draft: str,
    *,
    context_length: int | None = None,
    trust_remote_code: bool | str | ModelTrust = False,
    vocabulary: str = "same",
    min_intersection: float | None = None,
) -> PairReport:
    """Compare the tokenizers and configs of `target` and `draft` (HF ids or local directories),
    and check the weights of a local directory. Model code runs only for the model whose
    `trust_remote_code` (ModelTrust.of: one flag for both, or per model) allows it. With
    `vocabulary="intersection"` (or a draft that specdraft saved so: its vocabulary.json) the
    tokenizers may differ, and the intersection must hold `min_intersection` of the draft's
    tokens (None: draft.min_intersection's default)."""
    trust = ModelTrust.of(trust_remote_code)
    target_tok = _load(target, "tokenizer", trust.target, "target")
    target_cfg = _load(target, "config", trust.target, "target")
    draft_tok = _load(draft, "tokenizer", trust.draft, "draft")
    draft_cfg = _load(draft, "config", trust.draft, "draft")

    report = PairReport()
    report.problems += [p for p in (_pickle_only(target), _pickle_only(draft)) if p]
    report.problems += weight_problems(target, target_cfg) + weight_problems(draft, draft_cfg)
    if Path(draft).is_dir() and is_trimmed(draft):
        report.vocabulary = "trimmed"  # its tokens must be the target's kept ones
        report.problems += _compare_trimmed(
            target_tok, target_cfg, draft, draft_tok, draft_cfg, report.notes
        )
        report.notes.append(
            f"tokenizer: target {len(target_tok)} tokens, trimmed draft {len(draft_tok)}"
        )
    elif vocabulary == "intersection" or (Path(draft).is_dir() and is_intersection(draft)):
        report.vocabulary = "intersection"
        report.problems += _compare_intersection(
            target_tok, target_cfg, draft_tok, draft_cfg, min_intersection, report
        )
    else:
        problems = _compare_tokenizers(target_tok, draft_tok, report.notes)
        if problems:
            report.remedy = (
                "a draft with another tokenizer is served only through the token strings both "
                "vocabularies hold (vLLM's use_heterogeneous_vocab): opt in with "
                "draft.vocabulary=intersection (check-pair and eval: --vocabulary intersection)"
            )
        report.problems += problems
    _check_configs(
        target_cfg,
        draft_cfg,
        target_tok,
        draft_tok,
        context_length,
        report,
        own_vocabulary=report.vocabulary != "same",
    )
    for side, name, config in (("target", target, target_cfg), ("draft", draft, draft_cfg)):
        report.problems += _transform_problems(side, logit_transforms(config, _head_bias(name)))
    return report


def require_pair(
    target: str,
    draft: str,
    *,
    context_length: int | None = None,
    trust_remote_code: bool | str | ModelTrust = False,
    vocabulary: str = "same",
    min_intersection: float | None = None,
) -> PairReport:
    """The pair check `specdraft run`, `compare` and `eval` stop at: check_pair, and PairError
    listing every problem when the draft cannot serve the target."""
    report = check_pair(
        target,
        draft,
        context_length=context_length,
        trust_remote_code=trust_remote_code,
        vocabulary=vocabulary,
        min_intersection=min_intersection,
    )
    if not report.ok:
        raise PairError(
            f"target {target} and draft {draft} cannot be used together:\n  - "
            + "\n  - ".join(report.problems)
            + (f"\n  {report.remedy}" if report.remedy else "")
        )
    return report


def check_layer_draft(target: str, layers: int, *, trust_remote_code: bool = False) -> None:
    """A draft cut from the target's first `layers` decoder layers needs 1 <= layers < depth;
    PairError otherwise. The target's tokenizer is loaded too, so that a target whose tokenizer
    cannot be read stops here rather than in a stage."""
    full_config = _load(target, "config", trust_remote_code, "target")
    config = _text_config(full_config)
    _load(target, "tokenizer", trust_remote_code, "target")
    problems = [p for p in [_pickle_only(target)] if p] + weight_problems(target, full_config)
    problems += _transform_problems("target", logit_transforms(config, _head_bias(target)))
    if problems:
        raise PairError(f"target {target} cannot be distilled: {problems[0]}")
    depth = getattr(config, "num_hidden_layers", None)
    if depth is None:
        raise PairError(
            f"draft.from_target_layers: the config of {target!r} has no num_hidden_layers; "
            "give a draft model instead"
        )
    if not 1 <= layers < depth:
        raise PairError(
            f"draft.from_target_layers: {layers} is out of range; the target {target!r} has "
            f"{depth} decoder layers, so use 1..{depth - 1}"
        )


def format_report(report: PairReport, target: str, draft: str) -> str:
    """A short summary: the pair, the notes, then OK or every problem."""
    lines = [f"target {target!r}, draft {draft!r}"]
    lines += [f"  {note}" for note in report.notes]
    if report.ok and report.vocabulary == "same":
        lines.append("OK: the draft shares the target's tokenizer.")
    elif report.ok:
        lines.append(
            f"OK: the draft ({report.vocabulary} vocabulary) is served through the token strings "
            "both vocabularies hold: vLLM with use_heterogeneous_vocab, greedy drafting only."
        )
    else:
        count = len(report.problems)
        lines.append(
            f"NOT OK: {count} problem{'s' if count > 1 else ''}; a serving stack would reject this draft:"
        )
        lines += [f"  - {problem}" for problem in report.problems]
        lines += [f"  {report.remedy}"] if report.remedy else []
    return "\n".join(lines)


# --------------------------------------------------------------------------- logit transforms

# Config fields by which a model's logits are more than hidden @ head.T, with the value that
# means "not used". specdraft's KD loss, ΔL, alpha and decoder all build logits that way.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma-2/3: logits = c * tanh(logits / c)
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * multiplier
}


def logit_transforms(config, head_bias: bool = False) -> list[str]:
    """What `config`'s model does to its logits beyond hidden @ head.T ("name = value"), and an
    LM-head bias when `head_bias`. Empty when its logits are exactly that product."""
    text = _text_config(config)
    found = []
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(text, name, neutral)
        if value is not None and value != neutral:
            found.append(f"{name} = {value}")
    if head_bias:
        found.append("an LM-head bias")
    return found


def refuse_logit_transforms(model, role: str) -> None:
    """PairError naming the transform when the loaded `model`'s logits are not hidden @ head.T."""
    head = model.get_output_embeddings()
    found = logit_transforms(model.config, getattr(head, "bias", None) is not None)
    if found:
        raise PairError(_transform_problems(role, found)[0])


def _transform_problems(side: str, found: list[str]) -> list[str]:
    if not found:
        return []
    return [
        f"the {side}'s logits are not hidden @ head.T ({', '.join(found)}): specdraft's KD loss, "
        "loss gap, alpha and decoder do not apply that transform, so this model is not supported"
    ]


def _head_bias(name: str) -> bool:
    """Whether a local model directory's safetensors hold an LM-head bias (headers only; a hub id
    is not looked into: loading the model checks it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    for file in path.glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="pt") as f:
                if any(k.endswith("lm_head.bias") for k in f.keys()):
                    return True
        except (SafetensorError, OSError):
            continue  # an unreadable file is reported when a stage loads the model
    return False


# --------------------------------------------------------------------------- loading

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_only(name: str) -> str | None:
    """A local model directory whose weights are pickles only: specdraft loads safetensors only
    (unpickling runs code), so say so here rather than fail when a stage loads it."""
    path = Path(name).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return None
    return (
        f"{name} has only pickle weights ({', '.join(pickles[:3])}); specdraft loads safetensors "
        "only, since unpickling runs code: convert them where you trust the file, e.g. "
        "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`"
    )


# Bytes per element of the safetensors dtypes whose size is whole bytes (others are not sized).
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                        "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                        "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
SAFETENSORS_INDEX = "model.safetensors.index.json"
ZERO_SAMPLE_BYTES = 16  # read at the start of every tensor to tell zeroed weights


def weight_problems(name: str, config=None) -> list[str]:
    """What is wrong with the weights of a local model directory, read from the safetensors
    headers only (the tensors are not loaded): no weight files, a shard its index names missing,
    a file truncated or zeroed, a header that does not parse, an embedding or LM head whose rows
    differ from `config`'s vocab_size. A hub id or a GGUF file is not looked into here (loading
    it checks it), nor a directory of pickles only (_pickle_only says so)."""
    from specdraft.drafts.gguf import is_gguf

    path = Path(name).expanduser()
    if not path.is_dir() or is_gguf(name):
        return []
    files = sorted(path.glob("*.safetensors"))
    problems = []
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{name}: {SAFETENSORS_INDEX} is damaged (no weight_map); restore the model"]
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            problems.append(
                f"{name}: {_count(missing, 'weight file')} named in {SAFETENSORS_INDEX} "
                f"{'is' if len(missing) == 1 else 'are'} missing ({_examples(missing)}); "
                "restore the model"
            )
        files = sorted({*files, *(path / s for s in shards if (path / s).is_file())})
    if not files:
        if not any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            problems.append(f"{name} has no weight files (*.safetensors); restore the model")
        return problems
    vocab = getattr(_text_config(config), "vocab_size", None) if config is not None else None
    for file in files:
        problem = _safetensors_problem(file, vocab)
        if problem:
            problems.append(f"{name}: {file.name} {problem}; restore the model")
    return problems


def _safetensors_problem(file: Path, vocab_size: int | None) -> str | None:
    """What is wrong with one safetensors file, from its header and a few bytes of each tensor."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if length == 0 or length > size - 8:
                what = "is empty" if size == 0 else "has no valid header"
                return f"{what} ({size} bytes): truncated or zeroed"
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError(header)
            data = size - 8 - length
            samples = []
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                problem = _tensor_problem(key, entry, data, vocab_size)
                if problem:
                    return problem
                begin, end = entry["data_offsets"]
                f.seek(8 + length + begin)
                samples.append(f.read(min(end - begin, ZERO_SAMPLE_BYTES)))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return "has a header that is not a safetensors header (damaged)"
    if not samples:
        return "holds no tensors"
    if not any(any(sample) for sample in samples):
        return "has zero bytes at the start of every tensor: its weights were zeroed"
    return None


def _tensor_problem(key: str, entry, data: int, vocab_size: int | None) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) and begin <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        return f"has a damaged entry for tensor {key!r}"
    if end > data:
        return f"is truncated: tensor {key!r} ends at byte {end} of its data, the file holds {data}"
    itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        return f"has a damaged entry for tensor {key!r}: {dtype} {shape} in {end - begin} bytes"
    embedding = key.endswith(("embed_tokens.weight", "lm_head.weight"))
    if embedding and vocab_size is not None and shape and shape[0] != vocab_size:
        return (
            f"holds {key} with {shape[0]} rows, but config.json says vocab_size {vocab_size}: the "
            "weights are not this config's"
        )
    return None


def _load(name: str, what: str, trust_remote_code: bool, role: str = "model"):
    from transformers import AutoConfig, AutoTokenizer

    from specdraft.drafts.gguf import gguf_config, gguf_tokenizer, is_gguf

    if is_gguf(name):  # GGUFError names the file and what is wrong with it
        return gguf_tokenizer(name) if what == "tokenizer" else gguf_config(name)
    loader = AutoTokenizer if what == "tokenizer" else AutoConfig
    try:
        return loader.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ...
        # One line, no traceback: the cause is rephrased into what to do.
        why = _why(name, what, err, trust_remote_code, role)
        raise PairError(f"cannot load the {what} of {name!r}: {why}") from None


def shipped_code(name: str) -> list[str]:
    """The modules a local model directory names in an `auto_map` (config.json,
    tokenizer_config.json): code that loading it runs when its model is trusted."""
    modules = set()
    for file in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(name).expanduser() / file).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        refs = auto_map.values() if isinstance(auto_map, dict) else []
        for ref in refs:
            for one in ref if isinstance(ref, list) else [ref]:
                if isinstance(one, str) and "." in one:
                    modules.add(one.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(modules)


def untrusted_code_message(role: str, modules: list[str]) -> str:
    return (
        f"it ships its own code ({', '.join(modules)}), and specdraft runs a model's code only "
        f"when that model is trusted: {role}.trust_remote_code=true in the job (--trust-remote-code "
        f"for check-pair and eval) if you trust that code; trusting one model never runs the "
        "other's."
    )


def _why(name: str, what: str, err: Exception, trusted: bool = False, role: str = "model") -> str:
    path = Path(name).expanduser()
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if path.is_dir():
        modules = [] if trusted else shipped_code(name)
        if modules:
            return untrusted_code_message(role, modules)
        if what == "config" and not (path / "config.json").exists():
            return "the directory has no config.json."
        tokenizer_files = (
            "tokenizer.json",
            "tokenizer.model",
            "vocab.json",
            "tokenizer_config.json",
        )
        if what == "tokenizer" and not any((path / f).exists() for f in tokenizer_files):
            return f"the directory has no tokenizer files ({', '.join(tokenizer_files)})."
        return first_line
    if path.exists():
        return "it is a file, not a model directory."
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return "no such directory."
    if _hub_offline():
        return (
            "not a local directory and not in the Hugging Face cache (offline). "
            "Download it first or give a local directory."
        )
    return f"not a local directory, and the Hugging Face hub could not provide it ({first_line})"


def _hub_offline() -> bool:
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------- tokenizers


def _compare_trimmed(
    target_tok, target_cfg, draft: str, draft_tok, draft_cfg, notes: list[str]
) -> list[str]:
    """A vocabulary-trimmed draft (drafts/vocab_trim.py) is a pair with its target when its
    tokenizer holds exactly the target's strings of its kept ids (draft id i is kept_ids[i]; an
    added unk last), its rows are that vocabulary, and a server's mapping by token string
    (drafts/vocab_map.py) takes every kept id to its target id."""
    kept = kept_ids(draft)
    rows = _text_config(draft_cfg).vocab_size
    target_rows = _text_config(target_cfg).vocab_size
    if any(not 0 <= i < len(target_tok) for i in kept):
        return [f"the trimmed draft keeps ids outside the target's {len(target_tok)} tokens"]
    strings = target_tok.convert_ids_to_tokens(kept)
    vocab = draft_tok.get_vocab()
    wrong = [s for i, s in enumerate(strings) if vocab.get(s) != i]
    if wrong:
        return [
            f"the trimmed draft's tokenizer does not hold the target's strings of its kept ids "
            f"in order ({_count(wrong, 'token')} differ, e.g. {_examples(wrong)}): it was "
            "trimmed from another target"
        ]
    if rows != len(draft_tok):
        return [f"the trimmed draft has {rows} embedding rows for its {len(draft_tok)} tokens"]
    served = served_vocabulary_map(target_tok, draft_tok, target_rows, rows)
    notes.append(
        f"trimmed draft: {len(kept)} kept ids, {served.intersection} mapped by token string"
    )
    unmapped = [s for i, s in enumerate(strings) if served.draft_to_target[i] != kept[i]]
    if unmapped:  # strings alike once space markers are normalised: served, less often proposed
        notes.append(
            f"{_count(unmapped, 'kept token')} map to another target id by token string "
            f"(e.g. {_examples(unmapped)}): the draft never proposes them as themselves"
        )
    return []


def _compare_intersection(
    target_tok, target_cfg, draft_tok, draft_cfg, floor: float | None, report: PairReport
) -> list[str]:
    """A draft with another tokenizer (draft.vocabulary=intersection) is a pair with its target
    when a server's mapping by token string (drafts/vocab_map.py) holds at least `floor` of the
    draft's tokens. The intersection's size and shares go into the report's notes."""
    if floor is None:
        from specdraft.pipeline.config import DraftConfig

        floor = DraftConfig.min_intersection
    if not _compare_tokenizers(target_tok, draft_tok, []):
        report.notes.append(
            "the draft has the target's tokenizer: draft.vocabulary=same serves it without a "
            "mapping, by every engine"
        )
    try:
        served = served_vocabulary_map(
            target_tok,
            draft_tok,
            _text_config(target_cfg).vocab_size,
            _text_config(draft_cfg).vocab_size,
        )
    except InputError as err:  # a tokenizer with neither unk nor eos
        return [str(err)]
    report.vocabulary_map = served
    size, draft_share = served.intersection, served.intersection / len(draft_tok)
    report.notes.append(
        f"intersection: {size} token strings, {draft_share:.1%} of the draft's {len(draft_tok)} "
        f"tokens and {size / len(target_tok):.1%} of the target's {len(target_tok)}"
    )
    if draft_share < floor:
        return [
            f"the vocabularies share {size} token strings, {draft_share:.1%} of the draft's "
            f"{len(draft_tok)} tokens, below draft.min_intersection={floor}: served, the draft "
            "could propose too little of what it learned to write; give a draft whose tokenizer "
            "is closer to the target's, or lower draft.min_intersection"
        ]
    return []


def _compare_tokenizers(target, draft, notes: list[str]) -> list[str]:
    problems = []
    target_added = {tok.content for tok in target.added_tokens_decoder.values()}
    draft_added = {tok.content for tok in draft.added_tokens_decoder.values()}
    problems += _compare_vocab(target.get_vocab(), draft.get_vocab(), target_added | draft_added)
    problems += _compare_added_tokens(target.added_tokens_decoder, draft.added_tokens_decoder)
    problems += _compare_special_tokens(target, draft)
    problems += _compare_backends(target, draft, notes)
    notes.append(f"tokenizer: target {len(target)} tokens, draft {len(draft)}")
    return problems


def _compare_vocab(target: dict[str, int], draft: dict[str, int], added: set[str]) -> list[str]:
    only_target = sorted(set(target) - set(draft), key=target.get)
    only_draft = sorted(set(draft) - set(target), key=draft.get)
    moved = sorted((t for t in set(target) & set(draft) if target[t] != draft[t]), key=target.get)
    differing = set(only_target) | set(only_draft) | set(moved)
    if not differing or differing <= added:
        return []  # no difference, or only added tokens: the added-token check names those
    parts = []
    if only_target:
        parts.append(
            f"{_count(only_target, 'token')} only in the target ({_examples(only_target)})"
        )
    if only_draft:
        parts.append(f"{_count(only_draft, 'token')} only in the draft ({_examples(only_draft)})")
    if moved:
        parts.append(f"{_count(moved, 'shared token')} with different ids")
    problems = [
        f"vocabulary differs (target {len(target)} tokens, draft {len(draft)}): " + "; ".join(parts)
    ]
    problems += [
        f"token {t!r} has id {target[t]} in the target and {draft[t]} in the draft"
        for t in moved[:MAX_EXAMPLES]
    ]
    return problems


def _compare_added_tokens(target: dict, draft: dict) -> list[str]:
    problems = []
    for side, mine, other in (("target", target, draft), ("draft", draft, target)):
        only = [i for i in sorted(mine) if i not in other]
        if only:
            shown = ", ".join(f"{mine[i].content!r} ({i})" for i in only[:MAX_EXAMPLES])
            more = ", ..." if len(only) > MAX_EXAMPLES else ""
            problems.append(f"{_count(only, 'added token')} only in the {side}: {shown}{more}")
    attrs = ("content", "special", "lstrip", "rstrip", "single_word", "normalized")
    for i in sorted(set(target) & set(draft)):
        for attr in attrs:
            a, b = getattr(target[i], attr, None), getattr(draft[i], attr, None)
            if a != b:
                problems.append(
                    f"added token {i} differs in {attr}: target {_show(target[i], attr)}, "
                    f"draft {_show(draft[i], attr)}"
                )
                break
    return problems


def _show(token, attr: str) -> str:
    value = getattr(token, attr, None)
    return f"{value!r}" if attr == "content" else f"{token.content!r} {attr}={value}"


def _compare_special_tokens(target, draft) -> list[str]:
    problems = []
    names = list(dict.fromkeys([*target.special_tokens_map, *draft.special_tokens_map]))
    for name in names:
        a, b = target.special_tokens_map.get(name), draft.special_tokens_map.get(name)
        a_id = target.convert_tokens_to_ids(a) if a is not None else None
        b_id = draft.convert_tokens_to_ids(b) if b is not None else None
        if (a, a_id) != (b, b_id):
            problems.append(
                f"{name} differs: target {_special(a, a_id)}, draft {_special(b, b_id)}"
            )
    target_extra, draft_extra = _extra_special(target), _extra_special(draft)
    if target_extra != draft_extra:
        problems.append(
            "additional special tokens differ: "
            f"target {_special_list(target_extra)}, draft {_special_list(draft_extra)}"
        )
    return problems


def _extra_special(tok) -> list[tuple[str, int]]:
    # transformers 5 calls them extra_special_tokens (a list, or a dict of named extras).
    extra = getattr(tok, "extra_special_tokens", None)
    if extra is None:
        extra = getattr(tok, "additional_special_tokens", None) or []
    tokens = [str(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    return sorted((t, tok.convert_tokens_to_ids(t)) for t in tokens)


def _special(token: str | None, token_id: int | None) -> str:
    return "not set" if token is None else f"{token!r} ({token_id})"


def _special_list(tokens: list[tuple[str, int]]) -> str:
    if not tokens:
        return "none"
    shown = ", ".join(_special(t, i) for t, i in tokens[:MAX_EXAMPLES])
    return shown + (f", ... ({len(tokens)} in all)" if len(tokens) > MAX_EXAMPLES else "")


def _compare_backends(target, draft, notes: list[str]) -> list[str]:
    """Compare the `tokenizers` JSON: the model (merges and settings) and the text pipeline."""
    target_json, draft_json = _tokenizer_json(target), _tokenizer_json(draft)
    if target_json is None or draft_json is None:
        notes.append(
            "a tokenizer is not a fast (tokenizers) tokenizer: merges and normalizers were not "
            "compared, only the vocabulary, added and special tokens"
        )
        return []
    problems = _compare_models(target_json["model"], draft_json["model"])
    for section in ("normalizer", "pre_tokenizer", "decoder"):
        diff = _first_difference(target_json.get(section), draft_json.get(section))
        if diff:
            problems.append(f"{section} differs{_describe(diff)}")
    diff = _first_difference(target_json.get("post_processor"), draft_json.get("post_processor"))
    if diff:
        # Decides which special tokens wrap a prompt; serving stacks encode with the target's.
        notes.append(f"post_processor differs{_describe(diff)}")
    return problems


def _tokenizer_json(tok) -> dict | None:
    backend = getattr(tok, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _compare_models(target: dict, draft: dict) -> list[str]:
    if target.get("type") != draft.get("type"):
        return [
            f"tokenizer model type differs: target {target.get('type')}, draft {draft.get('type')}"
        ]
    kind = target.get("type")
    problems = []
    if kind == "BPE":
        target_merges, draft_merges = _merges(target), _merges(draft)
        if target_merges != draft_merges:
            index = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(target_merges, draft_merges, strict=False))
                    if a != b
                ),
                min(len(target_merges), len(draft_merges)),
            )
            sizes = (
                f"target {len(target_merges)} merges, draft {len(draft_merges)}; "
                if len(target_merges) != len(draft_merges)
                else ""
            )
            problems.append(
                f"merges differ ({sizes}first at index {index}: {_merge_at(target_merges, index)} "
                f"vs {_merge_at(draft_merges, index)})"
            )
        skip = {"vocab", "merges"}  # the vocabulary is compared through get_vocab()
    else:
        skip = {"vocab"} if isinstance(target.get("vocab"), dict) else set()
    for key in sorted((set(target) | set(draft)) - skip):
        diff = _first_difference(target.get(key), draft.get(key), key)
        if diff:
            problems.append(f"{kind} model differs{_describe(diff)}")
    return problems


def _merges(model: dict) -> list[str]:
    # tokenizers >= 0.20 stores merges as pairs; older files as "a b" strings.
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _merge_at(merges: list[str], index: int) -> str:
    return repr(merges[index]) if index < len(merges) else "(none)"


def _first_difference(a, b, path: str = ""):
    """(path, a_value, b_value) of the first place two JSON values differ, or None."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
    return path, a, b


def _describe(diff) -> str:
    path, a, b = diff
    where = f" at {path!r}" if path else ""
    return f"{where}: target {_short(a)}, draft {_short(b)}"


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "none"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _examples(tokens: list[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:MAX_EXAMPLES])
    return shown + (", ..." if len(tokens) > MAX_EXAMPLES else "")


# --------------------------------------------------------------------------- configs


def _check_configs(
    target_cfg, draft_cfg, target_tok, draft_tok, context_length, report, own_vocabulary=False
) -> None:
    target_text, draft_text = _text_config(target_cfg), _text_config(draft_cfg)
    if not own_vocabulary:  # a trimmed or intersection draft's rows are its own vocabulary's
        _check_vocab_sizes(target_text, draft_text, target_tok, draft_tok, report)
    target_ctx = getattr(target_text, "max_position_embeddings", None)
    draft_ctx = getattr(draft_text, "max_position_embeddings", None)
    report.notes.append(f"max_position_embeddings: target {target_ctx}, draft {draft_ctx}")
    report.context = min(math.inf if c is None else int(c) for c in (target_ctx, draft_ctx))
    if draft_ctx is None:
        if context_length is not None:
            report.notes.append(
                f"the draft config has no max_position_embeddings: context_length {context_length} "
                "not checked"
            )
    elif context_length is not None and draft_ctx < context_length:
        report.problems.append(
            f"the draft's max_position_embeddings {draft_ctx} is below context_length "
            f"{context_length}: the draft cannot cover the serving context"
        )
    elif context_length is None and target_ctx is not None and draft_ctx < target_ctx:
        report.notes.append(f"serve with a context of at most {draft_ctx} (the draft's limit)")


def _check_vocab_sizes(target_text, draft_text, target_tok, draft_tok, report) -> None:
    target_vocab = getattr(target_text, "vocab_size", None)
    draft_vocab = getattr(draft_text, "vocab_size", None)
    if target_vocab is None or draft_vocab is None:
        report.notes.append(
            f"vocab_size missing from a config (target {target_vocab}, draft {draft_vocab}): "
            "embedding sizes not compared"
        )
    elif target_vocab != draft_vocab:
        # Heads padded to different sizes over one tokenizer (Qwen2.5-7B 152 064 rows, -0.5B
        # 151 936) are a pair: every logit consumer compares over the tokenizer's ids only, and
        # the export pads the draft to the target's rows (vLLM wants equal vocab_size).
        short = [
            f"{side} {vocab}"
            for side, vocab, tok in (
                ("target", target_vocab, target_tok),
                ("draft", draft_vocab, draft_tok),
            )
            if vocab < len(tok)
        ]
        if short:
            report.problems.append(
                f"vocab_size differs: target {target_vocab}, draft {draft_vocab}, and "
                f"{' and '.join(short)} rows do not cover the tokenizer's {len(target_tok)} "
                "tokens (padded embeddings included)"
            )
        else:
            report.notes.append(
                f"vocab_size differs (target {target_vocab}, draft {draft_vocab}) only in padding "
                f"past the tokenizer's {len(target_tok)} tokens: logits are compared over those, "
                "and the export pads the draft to the target's vocab_size"
            )
    report.notes.append(f"vocab_size (embedding rows): target {target_vocab}, draft {draft_vocab}")
    for side, vocab, tok in (
        ("target", target_vocab, target_tok),
        ("draft", draft_vocab, draft_tok),
    ):
        if vocab is not None and len(tok) > vocab and target_vocab == draft_vocab:
            report.notes.append(
                f"the {side}'s tokenizer has {len(tok)} tokens but its vocab_size is {vocab}: "
                "ids past the embedding cannot be looked up"
            )


def _text_config(config):
    # Multimodal configs keep the language model's sizes in a text sub-config.
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config
