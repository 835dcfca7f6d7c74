"""The run's report.html (and the compare page) opened from disk in headless Chromium (Debian's chromium via
Playwright, as test_ui_browser.py): no console error, no request but file:// and data:, the loss plot and the
sample grid shown and loaded, the compare page's link leads to the run's page. A screenshot is kept in the test's
tmp folder, and in $LORA_TRAINER_SCREENSHOT_DIR when set."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_report import make_run  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_run_report_in_chromium(tmp_path):
    assert CHROMIUM, "apt-get install -y chromium (run_tests.sh does it for this stage)"
    from playwright.sync_api import expect, sync_playwright

    from lora_trainer.evaluate.report import write_compare_report, write_run_report

    run = make_run(tmp_path / "runs" / "tiny")
    report = write_run_report(run)
    compare = write_compare_report(tmp_path / "compare.html", {"best": "tiny", "notes": [], "runs": [
        {"name": "tiny", "path": str(run), "config": {}}]}, run / "samples" / "tiny-step00000004.png")
    errors, requests = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri())
        expect(page.locator("#loss-plot svg")).to_be_visible()
        grid = page.locator("#samples img.sample-grid-image").first
        expect(grid).to_be_visible()
        assert grid.evaluate("img => img.complete && img.naturalWidth") == 192  # the PNG loaded, at its size
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)

        page.goto(compare.as_uri())
        assert page.locator("#compare-grid").evaluate("img => img.complete && img.naturalWidth") == 192
        page.get_by_role("link", name="tiny").click()
        page.wait_for_url(report.as_uri())
        expect(page.locator("h1")).to_contain_text("tiny <b>run</b>")  # shown as text, not as markup
        browser.close()
    assert not errors, errors
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []
    assert report.as_uri() in requests and any(u.endswith("tiny-step00000004.png") for u in requests)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("LORA_TRAINER_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "run_report.png")
