"""The report in a real browser: headless Chromium loads index.html with no console errors, every
plot decodes and renders, and a screenshot is taken (Debian's chromium, installed by .ci/run)."""

import shutil

import pytest
from test_report import full_run

from specdraft.pipeline.stages.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed"),
]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.parametrize("width", [1280, 390], ids=["laptop", "phone"])
def test_report_renders_in_headless_chromium(tmp_path, width):
    sync_api = pytest.importorskip("playwright.sync_api")
    index = write_report(full_run(), tmp_path / "report")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "() => Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
            )
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            page.screenshot(path=str(tmp_path / f"report-{width}.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 6
    assert all(done and natural > 0 and shown > 0 for done, natural, shown in images)
    assert all(shown <= width for _, _, shown in images)  # plots scale to a phone's width
    assert overflow <= 1  # no sideways scrolling of the page itself (wide tables scroll inside)
    assert (tmp_path / f"report-{width}.png").stat().st_size > 10_000
