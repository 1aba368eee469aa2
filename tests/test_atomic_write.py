"""One atomic file writer (engine/artifacts.atomic_write_text) for manifests, metrics and reports."""

import os
import subprocess
import sys

import pytest

from specdraft.pipeline.engine.artifacts import atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    real_replace = os.replace

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_text_is_utf8_and_the_mode_follows_the_umask(tmp_path):
    path = tmp_path / "index.html"
    code = (
        "import os, sys; from pathlib import Path;"
        "from specdraft.pipeline.engine.artifacts import atomic_write_text;"
        "os.umask(int(sys.argv[2], 8)); atomic_write_text(Path(sys.argv[1]), 'α ≤ 1')"
    )
    for umask, mode in (("022", 0o644), ("077", 0o600)):
        subprocess.run([sys.executable, "-c", code, str(path), umask], check=True)
        assert path.read_bytes() == "α ≤ 1".encode()
        assert path.stat().st_mode & 0o777 == mode


def test_reports_and_training_histories_use_it():
    """No second writer: render, compare_render, report_cli and training.write_json go through it."""
    from specdraft.pipeline import training
    from specdraft.reports import compare_render, render, report_cli

    for module in (render, compare_render, report_cli, training):
        assert module.atomic_write_text is atomic_write_text
    assert not hasattr(render, "write_atomic")
