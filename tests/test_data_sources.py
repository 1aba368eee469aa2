"""load_user_data: every source kind, field mapping, splitting, and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from specdraft.pipeline.config import DataConfig, InputError
from specdraft.pipeline.data_sources import DataError, describe_source, load_user_data

ROWS = [
    {"prompt": f"prompt {i}", "response": f"response {i}", "task": f"t{i % 2}"} for i in range(10)
]
COLUMNS = ["prompt", "response", "task"]


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_rows(dd: datasets.DatasetDict) -> list[dict]:
    return [*dd["train"], *dd["eval"]]


def assert_shape(dd: datasets.DatasetDict) -> None:
    assert list(dd) == ["train", "eval"]
    for split in dd.values():
        assert split.column_names == COLUMNS
        assert all(split.features[c] == datasets.Value("string") for c in COLUMNS)


def test_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    before = sorted(p.name for p in tmp_path.iterdir())
    dd = load_user_data(cfg(path, eval_ratio=0.2), seed=0)
    assert_shape(dd)
    assert (len(dd["train"]), len(dd["eval"])) == (8, 2)
    assert sorted(all_rows(dd), key=lambda r: r["prompt"]) == sorted(
        ROWS, key=lambda r: r["prompt"]
    )
    # Nothing (no cache, no lock file) is written next to the user's file.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert describe_source(cfg(path)) == f"json file {path.resolve()}"


def test_json_list_csv_parquet_files_load_the_same_rows(tmp_path):
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(ROWS))
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(str(tmp_path / "data.csv"), index=False)
    table.to_parquet(str(tmp_path / "data.parquet"))
    for name in ("data.json", "data.csv", "data.parquet"):
        dd = load_user_data(cfg(tmp_path / name), seed=3)
        assert_shape(dd)
        assert sorted(r["prompt"] for r in all_rows(dd)) == sorted(r["prompt"] for r in ROWS), name
        by_prompt = {r["prompt"]: r for r in all_rows(dd)}
        assert by_prompt["prompt 3"] == ROWS[3], name


def test_directory_of_jsonl_files_is_one_training_set(tmp_path):
    write_jsonl(tmp_path / "d" / "part-a.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "d" / "nested" / "part-b.jsonl", ROWS[4:])
    (tmp_path / "d" / "README.md").write_text("ignored: not a data file")
    write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "part-a.jsonl", [{"prompt": "hidden"}])
    dd = load_user_data(cfg(tmp_path / "d"), seed=0)
    assert_shape(dd)
    assert sorted(r["prompt"] for r in all_rows(dd)) == sorted(r["prompt"] for r in ROWS)
    assert "(train: 2)" in describe_source(cfg(tmp_path / "d"))


def test_directory_files_named_after_splits_become_those_splits(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[7:])
    dd = load_user_data(cfg(tmp_path / "d", eval_split="test"), seed=0)
    assert [r["prompt"] for r in dd["train"]] == [r["prompt"] for r in ROWS[:7]]
    assert [r["prompt"] for r in dd["eval"]] == [r["prompt"] for r in ROWS[7:]]


def test_directory_of_parquet_files_with_hub_metadata(tmp_path):
    (tmp_path / "d").mkdir()
    datasets.Dataset.from_list(ROWS[:5]).to_parquet(str(tmp_path / "d" / "train-0.parquet"))
    datasets.Dataset.from_list(ROWS[5:]).to_parquet(str(tmp_path / "d" / "train-1.parquet"))
    (tmp_path / "d" / "dataset_info.json").write_text("{}")
    dd = load_user_data(cfg(tmp_path / "d"), seed=0)
    assert sorted(r["prompt"] for r in all_rows(dd)) == sorted(r["prompt"] for r in ROWS)


def test_save_to_disk_dataset(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    dd = load_user_data(cfg(tmp_path / "saved", eval_ratio=0.3), seed=0)
    assert_shape(dd)
    assert (len(dd["train"]), len(dd["eval"])) == (7, 3)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before
    assert describe_source(cfg(tmp_path / "saved")).startswith("save_to_disk directory")


def test_save_to_disk_dataset_dict_with_eval_split(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:6]),
            "test": datasets.Dataset.from_list(ROWS[6:]),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    dd = load_user_data(cfg(tmp_path / "saved", eval_split="test"), seed=0)
    assert_shape(dd)
    assert [r["prompt"] for r in dd["train"]] == [r["prompt"] for r in ROWS[:6]]
    assert [r["prompt"] for r in dd["eval"]] == [r["prompt"] for r in ROWS[6:]]
    # data.split picks which split trains.
    dd = load_user_data(cfg(tmp_path / "saved", split="test", eval_split="train"), seed=0)
    assert [r["prompt"] for r in dd["train"]] == [r["prompt"] for r in ROWS[6:]]


def test_field_mapping_and_non_string_values(tmp_path):
    rows = [{"question": i, "answer": f"a{i}", "category": i % 3, "extra": 0} for i in range(6)]
    rows[0]["answer"] = rows[1]["category"] = None
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    mapping = {"prompt_field": "question", "response_field": "answer", "task_field": "category"}
    dd = load_user_data(cfg(path, **mapping), seed=0)
    assert_shape(dd)
    got = sorted(all_rows(dd), key=lambda r: int(r["prompt"]))
    want = [{"prompt": str(i), "response": f"a{i}", "task": str(i % 3)} for i in range(6)]
    want[0]["response"], want[1]["task"] = "", "default"
    assert got == want
    # Structured prompts are written out with str().
    path = write_jsonl(tmp_path / "lists.jsonl", [{"prompt": [i, i + 1]} for i in range(3)])
    dd = load_user_data(cfg(path), seed=0)
    assert sorted(r["prompt"] for r in all_rows(dd)) == ["[0, 1]", "[1, 2]", "[2, 3]"]


def test_prompt_only_data_gets_empty_responses_and_default_task(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    dd = load_user_data(cfg(path), seed=0)
    assert_shape(dd)
    assert {(r["response"], r["task"]) for r in all_rows(dd)} == {("", "default")}
    # An empty response_field ignores a response column that is there.
    full = write_jsonl(tmp_path / "full.jsonl", ROWS)
    dd = load_user_data(cfg(full, response_field=""), seed=0)
    assert {r["response"] for r in all_rows(dd)} == {""}
    assert {r["task"] for r in all_rows(dd)} == {"t0", "t1"}


def test_eval_ratio_split_is_deterministic_disjoint_and_seeded(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    first = load_user_data(cfg(path, eval_ratio=0.25), seed=7)
    again = load_user_data(cfg(path, eval_ratio=0.25), seed=7)
    other = load_user_data(cfg(path, eval_ratio=0.25), seed=8)
    train, evaluation = set(first["train"]["prompt"]), set(first["eval"]["prompt"])
    assert (len(train), len(evaluation)) == (30, 10)
    assert not train & evaluation
    assert train | evaluation == {r["prompt"] for r in rows}
    assert first["eval"]["prompt"] == again["eval"]["prompt"]
    assert first["train"]["prompt"] == again["train"]["prompt"]
    assert set(other["eval"]["prompt"]) != evaluation


def test_eval_ratio_keeps_one_row_on_each_side(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", ROWS[:2])
    for ratio in (0.01, 0.9):
        dd = load_user_data(cfg(path, eval_ratio=ratio), seed=0)
        assert (len(dd["train"]), len(dd["eval"])) == (1, 1)


def test_limit_caps_training_rows_after_the_split(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    full = load_user_data(cfg(path, eval_ratio=0.2), seed=1)
    capped = load_user_data(cfg(path, eval_ratio=0.2, limit=5), seed=1)
    assert len(capped["train"]) == 5
    assert capped["eval"]["prompt"] == full["eval"]["prompt"]  # eval untouched by the limit
    assert capped["train"]["prompt"] == full["train"]["prompt"][:5]


def test_rows_with_empty_prompts_are_dropped_with_a_warning(tmp_path):
    rows = [*ROWS[:6], {"prompt": ""}, {"prompt": None}, {"prompt": "   "}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 3 of 9 rows"):
        dd = load_user_data(cfg(path), seed=0)
    assert sorted(r["prompt"] for r in all_rows(dd)) == [r["prompt"] for r in ROWS[:6]]


# --- errors ------------------------------------------------------------------------------------


def load_error(source, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_user_data(cfg(source, **kw), seed=0)
    return str(info.value)


@pytest.mark.parametrize(
    "source", ["/nope/data.jsonl", "data/missing.csv", "./nowhere", "~/x", "no/such/dir"]
)
def test_missing_local_path_says_it_does_not_exist(source):
    assert "does not exist" in load_error(source)


def test_missing_prompt_field_lists_columns_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    message = load_error(path)
    assert "'prompt'" in message
    assert "question, answer" in message
    assert "data.prompt_field=" in message


def test_explicit_missing_response_or_task_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    assert "'answer'" in load_error(path, response_field="answer")
    assert "data.response_field=" in load_error(path, response_field="answer")
    assert "'category'" in load_error(path, task_field="category")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.json"])
def test_empty_file_has_no_rows(tmp_path, name):
    path = tmp_path / name
    path.write_text("[]" if name.endswith(".json") else "")
    assert "has no rows" in load_error(path)


def test_header_only_csv_and_empty_parquet_have_no_rows(tmp_path):
    (tmp_path / "h.csv").write_text("prompt,response\n")
    assert "has no rows" in load_error(tmp_path / "h.csv")
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "e.parquet"))
    assert "has no rows" in load_error(tmp_path / "e.parquet")
    # load_from_disk cannot read a split saved empty; the message still says what is wrong.
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "saved"))
    assert "has no rows" in load_error(tmp_path / "saved")
    empty_test = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:0])}
    )
    empty_test.save_to_disk(str(tmp_path / "saved_dict"))
    assert "has no rows in test" in load_error(tmp_path / "saved_dict")


def test_every_prompt_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": None}])
    assert "every one of its 2 rows" in load_error(path)


def test_a_single_row_cannot_be_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    assert "at least 2" in load_error(path)


def test_unknown_split_lists_the_splits(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:6]),
            "test": datasets.Dataset.from_list(ROWS[6:]),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    message = load_error(tmp_path / "saved", split="validation")
    assert "data.split='validation'" in message and "train, test" in message
    message = load_error(tmp_path / "saved", eval_split="dev")
    assert "data.eval_split='dev'" in message and "train, test" in message
    # A single split trains whatever it is called, but a named eval split must exist.
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert "data.eval_split='test'" in load_error(tmp_path / "single", eval_split="test")


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "without .jsonl" in load_error(tmp_path / "empty")
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_csv(str(tmp_path / "mixed" / "b.csv"))
    assert "mixes file types" in load_error(tmp_path / "mixed")
    write_jsonl(tmp_path / "half" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "half" / "extra.jsonl", ROWS)
    assert "extra.jsonl" in load_error(tmp_path / "half")


def test_unsupported_or_malformed_files(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    assert "unsupported type '.txt'" in load_error(tmp_path / "data.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    assert "could not be read as json" in load_error(tmp_path / "bad.jsonl")


def test_builtin_is_not_user_data_and_errors_are_input_errors():
    assert "builtin" in load_error("builtin")
    # The CLI prints an InputError's message and exits 2, without a traceback.
    with pytest.raises(InputError):
        load_user_data(cfg("/nope/data.jsonl"), seed=0)


def offline(monkeypatch, cache: Path) -> None:
    # datasets reads these once at import, so the module-level copies are patched too.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


def test_hub_name_offline_and_not_cached_is_a_data_error(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path / "cache")
    message = load_error("specdraft-tests/not-cached")
    assert "dataset 'specdraft-tests/not-cached' is not a local path" in message
    assert "pre-download" in message
    assert describe_source(cfg("specdraft-tests/not-cached")).startswith("hub dataset")


def test_hub_name_offline_resolves_from_the_datasets_cache(tmp_path, monkeypatch):
    # Build a cache entry the way datasets lays one out: <cache>/<org>___<name>/<config>/
    # <version>/<hash>/ with dataset_info.json and <name>-<split>.arrow.
    built = datasets.load_dataset(
        "json",
        data_files=str(write_jsonl(tmp_path / "src.jsonl", ROWS)),
        cache_dir=str(tmp_path / "build"),
    )
    arrow = Path(built["train"].cache_files[0]["filename"])
    entry = tmp_path / "cache" / "someorg___cached-set" / "default" / "0.0.0" / "abc"
    entry.mkdir(parents=True)
    shutil.copy(arrow.parent / "dataset_info.json", entry)
    shutil.copy(arrow, entry / "cached-set-train.arrow")
    offline(monkeypatch, tmp_path / "cache")
    dd = load_user_data(cfg("someorg/cached-set"), seed=0)
    assert_shape(dd)
    assert sorted(r["prompt"] for r in all_rows(dd)) == sorted(r["prompt"] for r in ROWS)
