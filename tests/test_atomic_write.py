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


def test_reports_and_training_histories_use_it(tmp_path, monkeypatch):
    """No second writer: the renderers write nothing, the report and comparison stages and
    `specdraft report` write their pages with it, and the training stages' histories with
    artifacts.write_json, which goes through it."""
    from specdraft.pipeline import toy_training
    from specdraft.pipeline.commands import report as report_command
    from specdraft.pipeline.engine import artifacts
    from specdraft.pipeline.stages import comparison, distil, reference, report
    from specdraft.reports import compare_render, render

    for module in (report, comparison, report_command):
        assert module.atomic_write_text is atomic_write_text
    for module in (render, compare_render):
        assert not hasattr(module, "atomic_write_text")
    for module in (distil, reference, toy_training):
        assert module.write_json is artifacts.write_json
    assert not hasattr(render, "write_atomic")
    written = []
    monkeypatch.setattr(artifacts, "atomic_write_text", lambda *args: written.append(args))
    artifacts.write_json(tmp_path / "history.json", [{"step": 1}])
    assert written == [(tmp_path / "history.json", '[\n  {\n    "step": 1\n  }\n]')]
