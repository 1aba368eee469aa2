"""User data for the `data` stage: a local file or directory, or a hub dataset from the cache.

`load_user_data` turns any supported source into one shape, a DatasetDict with the splits `train`
and `eval` and the string columns `prompt`, `response` and `task`. Every bad input raises a
`DataError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets

from specdraft.errors import InputError
from specdraft.pipeline.config import DataConfig

# File suffix -> the `datasets` packaged loader that reads it.
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_LOADERS = {"json", "csv"}  # their files must be UTF-8 text
COLUMNS = ("prompt", "response", "task")
DEFAULT_TASK = "default"
# Metadata a hub snapshot may carry beside its data files; never rows.
METADATA_FILES = {"dataset_info.json", "dataset_infos.json"}
# The only copy of these defaults is DataConfig; a field left at its default may be absent.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}


class DataError(InputError):
    """Bad data input; the message says what is wrong and how to fix it."""


@dataclass
class _Source:
    kind: str  # "file", "files" (a directory of files), "saved" (save_to_disk) or "hub"
    name: str  # the path (absolute) or the hub dataset name
    loader: str = ""  # json / csv / parquet for "file" and "files"
    files: dict[str, list[str]] | None = None  # split -> files, for "file" and "files"


def _looks_like_path(source: str) -> bool:
    """A hub name is `name` or `org/name`; anything else path-shaped is meant as a local path."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in LOADERS
    )


def _directory_splits(path: Path) -> tuple[str, dict[str, list[str]]]:
    """The loader and split -> files of a directory of data files (one file type only).

    Files named after a split (`train.jsonl`, `test-00001.parquet`, ...) go to that split, as on
    the hub; if no file is so named, every file is training data.
    """
    found: dict[str, list[Path]] = {}
    for file in sorted(path.rglob("*")):
        hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
        suffix = file.suffix.lower()
        if file.is_file() and not hidden and suffix in LOADERS and file.name not in METADATA_FILES:
            found.setdefault(suffix, []).append(file.resolve())
    if not found:
        raise DataError(
            f"data.source {str(path)!r} is a directory without .jsonl, .json, .csv or .parquet "
            "files; put the data files there or point data.source at a file"
        )
    if len(found) > 1:
        kinds = ", ".join(f"{len(v)} {k}" for k, v in found.items())
        raise DataError(
            f"data.source {str(path)!r} mixes file types ({kinds}); keep one type of file in the "
            "directory or point data.source at a single file"
        )
    ((suffix, files),) = found.items()
    patterns = datasets.data_files.get_data_patterns(str(path))
    named = datasets.data_files.DataFilesDict.from_patterns(patterns, base_path=str(path))
    wanted = set(files)
    splits = {
        str(split): sorted(str(f) for f in named_files if Path(f).resolve() in wanted)
        for split, named_files in named.items()
    }
    splits = {split: split_files for split, split_files in splits.items() if split_files}
    assigned = {Path(f) for split_files in splits.values() for f in split_files}
    if assigned != wanted:
        # Some files are named after a split and some are not: guessing would mix or lose data.
        stray = sorted(str(f.relative_to(path.resolve())) for f in wanted - assigned)
        raise DataError(
            f"data.source {str(path)!r}: files {', '.join(stray[:5])} do not name a split while "
            f"others do ({', '.join(splits)}); rename them (e.g. train-1{suffix}) or move them out"
        )
    return LOADERS[suffix], splits


def _resolve(source: str) -> _Source:
    if source == "builtin":
        raise DataError(
            "data.source is `builtin`: the toy task suite is built by the data stage, not loaded; "
            "give a file, a directory or a hub dataset name to use your own data"
        )
    if not source.strip():
        raise DataError("data.source is empty; give a file, a directory or a hub dataset name")
    path = Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _Source("saved", str(path))
        loader, files = _directory_splits(path)
        return _Source("files", str(path), loader, files)
    if path.is_file():
        path = path.resolve()
        loader = LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DataError(
                f"data.source {source!r} has the unsupported type {path.suffix or '(none)'!r}; "
                "use a .jsonl, .json, .csv or .parquet file"
            )
        return _Source("file", str(path), loader, {"train": [str(path)]})
    if _looks_like_path(source):
        raise DataError(
            f"data.source {source!r} does not exist (looked for {path.absolute()}); fix the path "
            "or give a hub dataset name (`name` or `org/name`)"
        )
    return _Source("hub", source)


def describe_source(cfg: DataConfig) -> str:
    """One line naming what `cfg.source` resolves to, for logs; raises DataError like loading."""
    src = _resolve(cfg.source)
    if src.kind == "file":
        return f"{src.loader} file {src.name}"
    if src.kind == "files":
        counts = ", ".join(f"{split}: {len(files)}" for split, files in src.files.items())
        return f"directory {src.name} of {src.loader} files ({counts})"
    if src.kind == "saved":
        return f"save_to_disk directory {src.name}"
    return f"hub dataset {src.name!r} (through the datasets cache)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _empty_saved_splits(path: Path) -> list[str]:
    """Splits of a save_to_disk directory saved with no rows (load_from_disk cannot read them)."""
    empty = []
    for state in sorted([path / "state.json", *path.glob("*/state.json")]):
        if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
            empty.append(state.parent.name if state.parent != path else "(the dataset)")
    return empty


def _check_utf8(path: Path) -> None:
    """DataError naming the line and byte where text file `path` stops being UTF-8 (the loaders
    would fail later, or keep undecodable bytes that break the data stage)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            pending = decoder.getstate()[0]  # a character cut by the previous chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                data = pending + chunk  # what err.start counts in
                line += data[len(pending) : max(err.start, len(pending))].count(b"\n")
                raise DataError(
                    f"data file {str(path)!r} is not UTF-8 text (line {line}, byte "
                    f"{offset - len(pending) + err.start}: 0x{data[err.start]:02x}); save it "
                    "as UTF-8"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"data file {str(path)!r} is not UTF-8 text (it ends inside a character); save it "
                "as UTF-8"
            ) from None


def _load(src: _Source, subset: str = "") -> datasets.DatasetDict:
    if src.kind == "saved":
        try:
            loaded = datasets.load_from_disk(src.name)
        except Exception as err:
            empty = _empty_saved_splits(Path(src.name))
            if empty:
                raise DataError(
                    f"data.source {src.name!r} has no rows in {', '.join(empty)}; save it again "
                    "with rows in every split"
                ) from err
            raise DataError(
                f"data.source {src.name!r} looks like a save_to_disk directory but could not be "
                f"loaded ({_first_line(err)}); save it again with Dataset.save_to_disk"
            ) from err
    elif src.kind == "hub":
        try:
            loaded = datasets.load_dataset(src.name, subset or None)
        except Exception as err:
            raise DataError(
                f"dataset {src.name!r} is not a local path and could not be loaded from the hub "
                f"cache: {_first_line(err)}. Give a local file or directory, or pre-download it "
                "with datasets on a machine with network access"
            ) from err
    else:
        if all(Path(f).stat().st_size == 0 for files in src.files.values() for f in files):
            raise DataError(f"data.source {src.name!r} has no rows (its files are empty)")
        if src.loader in TEXT_LOADERS:
            for files in src.files.values():
                for file in files:
                    _check_utf8(Path(file))
        try:
            # The default cache (~/.cache/huggingface/datasets) holds the Arrow copy; nothing is
            # written next to the user's files.
            loaded = datasets.load_dataset(src.loader, data_files=src.files)
        except Exception as err:
            if "corresponds to no data" in str(err):
                raise DataError(f"data.source {src.name!r} has no rows") from err
            cause = err.__cause__ if err.__cause__ is not None else err
            raise DataError(
                f"data.source {src.name!r} could not be read as {src.loader} "
                f"({_first_line(cause)}); check the file format"
            ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            f"data.source {src.name!r} loaded as {type(loaded).__name__}, not a dataset"
        )
    return loaded


def _pick_split(
    loaded: datasets.DatasetDict, name: str, key: str, source: str
) -> tuple[str, datasets.Dataset]:
    """(split name, split): a dataset with one split trains on it whatever it is called."""
    if name in loaded:
        return name, loaded[name]
    if key == "data.split" and len(loaded) == 1:
        return next(iter(loaded.items()))
    raise DataError(
        f"{key}={name!r} is not a split of {source!r}; its splits are {', '.join(loaded)}. "
        f"Set {key}=<one of them>"
    )


def _to_columns(ds: datasets.Dataset, cfg: DataConfig, what: str) -> dict[str, list[str]]:
    """prompt/response/task as lists of str; rows with an empty prompt are dropped (and counted)."""
    if len(ds) == 0:
        raise DataError(f"{what} has no rows")
    ds = ds.with_format(None)  # plain Python values even if the saved dataset has a format
    available = ds.column_names
    if cfg.prompt_field not in available:
        raise DataError(
            f"{what} has no prompt field {cfg.prompt_field!r}; its columns are "
            f"{', '.join(available) or '(none)'}. Set data.prompt_field=<one of them>"
        )
    optional = {
        "response": (cfg.response_field, "response_field", ""),
        "task": (cfg.task_field, "task_field", DEFAULT_TASK),
    }
    for field_name, default_key, _ in optional.values():
        explicit = field_name and field_name != _DEFAULTS[default_key]
        if explicit and field_name not in available:
            raise DataError(
                f"{what} has no {default_key.removesuffix('_field')} field {field_name!r}; its "
                f"columns are {', '.join(available)}. Set data.{default_key}=<one of them> or "
                f"leave it at its default"
            )
    prompts = ds[cfg.prompt_field][:]  # a list; iterating the lazy Column row by row is slow
    columns = {"prompt": prompts}
    for column, (field_name, _, fill) in optional.items():
        present = field_name and field_name in available
        values = ds[field_name][:] if present else [fill] * len(ds)
        columns[column] = [fill if v is None else str(v) for v in values]
    keep = [i for i, p in enumerate(prompts) if p is not None and str(p).strip()]
    dropped = len(prompts) - len(keep)
    if dropped == len(prompts):
        raise DataError(
            f"{what}: every one of its {len(prompts)} rows has an empty {cfg.prompt_field!r}; "
            "check data.prompt_field"
        )
    if dropped:
        warnings.warn(
            f"data: dropped {dropped} of {len(prompts)} rows of {what} whose "
            f"{cfg.prompt_field!r} is empty; remove them from the data to silence this",
            stacklevel=3,
        )
    columns["prompt"] = [str(p) for p in prompts]
    return {column: [values[i] for i in keep] for column, values in columns.items()}


def _dataset(columns: dict[str, list[str]]) -> datasets.Dataset:
    features = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
    return datasets.Dataset.from_dict({c: columns[c] for c in COLUMNS}, features=features)


def load_user_data(cfg: DataConfig, seed: int) -> datasets.DatasetDict:
    """Load `cfg.source` as splits `train` and `eval` with string columns prompt/response/task.

    Evaluation rows come from `cfg.eval_split`, or else `cfg.eval_ratio` of the training rows is
    held out, chosen by `seed`. `cfg.limit` caps the training rows that remain.
    """
    src = _resolve(cfg.source)
    loaded = _load(src, cfg.subset)
    name, train = _pick_split(loaded, cfg.split, "data.split", cfg.source)
    train_cols = _to_columns(train, cfg, f"split {name!r} of {cfg.source!r}")
    if cfg.eval_split:
        name, evaluation = _pick_split(loaded, cfg.eval_split, "data.eval_split", cfg.source)
        eval_cols = _to_columns(evaluation, cfg, f"split {name!r} of {cfg.source!r}")
    else:
        n = len(train_cols["prompt"])
        if n < 2:
            raise DataError(
                f"data.source {cfg.source!r} has {n} usable row; holding out evaluation rows "
                "needs at least 2. Add rows or give data.eval_split"
            )
        n_eval = min(max(1, round(n * cfg.eval_ratio)), n - 1)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        eval_cols = {c: [v[i] for i in eval_idx] for c, v in train_cols.items()}
        train_cols = {c: [v[i] for i in train_idx] for c, v in train_cols.items()}
    if cfg.limit > 0:
        train_cols = {c: v[: cfg.limit] for c, v in train_cols.items()}
    return datasets.DatasetDict({"train": _dataset(train_cols), "eval": _dataset(eval_cols)})
