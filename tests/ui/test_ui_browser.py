"""The standalone UI in headless Chromium (Debian's chromium via Playwright; gradio4 stage): load a folder with a
truncated PNG and a duplicate and see the doctor's findings table, add a zip of images from the browser, caption the
folder, see the advanced form follow Low VRAM, train the tiny model for 3 steps, see the loss plot and samples, render the test grid,
take a screenshot (LORA_TRAINER_SCREENSHOT=path also keeps it, e.g. docs/standalone_ui.png), then open "Merge into
checkpoint": its fields show the trained LoRA's strength and name, and Merge writes the checkpoint beside the base.
Then Queue: two runs queued from the page, followed to the end, listed in the queue table with their report pages."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TinyBackend  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_caption_folder(folder, options=None, **_):
    """The captioner's contract (one result per newly captioned image, written to metadata.csv), no weights."""
    from lora_trainer.data.captions import CaptionResult, read_captions, write_captions
    from lora_trainer.data.images import list_images

    folder = Path(folder)
    captions = dict(read_captions(folder).captions)
    for p in list_images(folder):
        if p.name not in captions:
            captions[p.name] = f"{options.trigger}, a small painted house"
            yield CaptionResult(p.name, "new", captions[p.name])
        else:
            yield CaptionResult(p.name, "kept", captions[p.name], captions[p.name])
    write_captions(folder, captions, fmt="csv")


def test_standalone_ui_in_chromium(tmp_path, tiny_sd1, tiny_sd1_file, monkeypatch):
    assert CHROMIUM, "apt-get install -y chromium (run_tests.sh does it for this stage)"
    from playwright.sync_api import expect, sync_playwright

    import lora_trainer.data.captions as captions
    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.data.doctor import examine
    from lora_trainer.ui import build_blocks

    monkeypatch.setattr(captions, "caption_folder", _fake_caption_folder)
    folder = tmp_path / "images"
    folder.mkdir()
    big = make_demo_images(tmp_path / "big", n=4, size=256)  # not below the default smallest bucket: fewer findings
    for p in sorted(big.glob("*.png")):
        shutil.copy(p, folder / p.name)
    # What a real A1111 run met: a truncated PNG first in name order; and a copy of another image.
    (folder / "000_broken.png").write_bytes((folder / "img001.png").read_bytes()[:300])
    shutil.copy(folder / "img002.png", folder / "img002_copy.png")
    broken_fix = next(f.fix for f in examine(folder).findings if f.file == "000_broken.png")
    upload = tmp_path / "from_the_browser.zip"  # Add images: a zip from the browser's machine
    with zipfile.ZipFile(upload, "w") as z:
        z.write(big / "img004.png", "holiday/beach.png")

    models = tmp_path / "models"  # the base as a file, for Merge into checkpoint (training uses tiny_sd1 itself)
    models.mkdir()
    base = Path(shutil.copy(tiny_sd1_file, models / "tiny-sd1.safetensors"))
    blocks = build_blocks(TinyBackend(tmp_path / "runs", base_model=str(base), components=tiny_sd1, sample_steps=2,
                                      sample_size=64))
    blocks.queue()
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
            page = browser.new_page(viewport={"width": 1100, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            status = page.locator("#lora_trainer_status textarea")
            page.locator("#lora_trainer_folder textarea").fill(str(folder))
            page.locator("#lora_trainer_load").click()
            expect(status).to_have_value(re.compile(r"^6 images, 5 usable; 1 error\(s\)"), timeout=30_000)
            expect(status).to_have_value(re.compile("Training skips 1: 000_broken.png \\(unreadable\\)"))
            findings = page.locator("#lora_trainer_findings")
            for text in ("000_broken.png", "unreadable", broken_fix, "img002_copy.png", "duplicate"):
                expect(findings).to_contain_text(text)

            page.locator("#lora_trainer_add_images input[type=file]").set_input_files(str(upload))
            expect(status).to_have_value(re.compile(f"^Added 1 file\\(s\\) to {re.escape(str(folder))}: beach.png"),
                                         timeout=30_000)
            expect(status).to_have_value(re.compile("7 images, 6 usable"))
            expect(findings).to_contain_text("beach.png")  # a copy of img004.png: the doctor says so
            assert (folder / "beach.png").read_bytes() == (big / "img004.png").read_bytes()

            page.locator("#lora_trainer_trigger textarea").fill("inkwash")
            page.locator("#lora_trainer_caption").click()
            expect(status).to_have_value(re.compile("^captioned 7 images"), timeout=30_000)
            assert "inkwash, a small painted house" in (folder / "metadata.csv").read_text()

            # The advanced form follows Low VRAM (and the preset): it shows what the run will use.
            accumulation = page.locator("#lora_trainer_opt_gradient_accumulation_steps input")
            page.locator("#lora_trainer_advanced").get_by_text("Advanced options").click()
            expect(accumulation).to_have_value("1")
            page.locator("#lora_trainer_low_vram input").check()
            expect(accumulation).to_have_value("4")
            page.locator("#lora_trainer_low_vram input").uncheck()
            expect(accumulation).to_have_value("1")
            page.locator("#lora_trainer_advanced").get_by_text("Advanced options").click()  # closed for the screenshot

            page.locator("#lora_trainer_name textarea").fill("tiny-lora")
            page.locator("#lora_trainer_train").click()
            expect(status).to_have_value(re.compile("^Done: 3 steps"), timeout=180_000)
            expect(status).to_have_value(re.compile("Skipped 1 image\\(s\\) training could not use: 000_broken.png"))
            expect(page.locator("#lora_trainer_loss img")).to_be_visible()
            expect(page.locator("#lora_trainer_sample img")).to_be_visible()

            page.locator("#lora_trainer_test_prompt textarea").fill("inkwash house")
            page.locator("#lora_trainer_test").click()
            expect(page.locator("#lora_trainer_grid img")).to_be_visible(timeout=120_000)
            shot = tmp_path / "tab.png"
            page.screenshot(path=str(shot), full_page=True)

            # Merge into checkpoint: the fields were filled after Train (the usage hint's 0.7, the default name)
            page.locator("#lora_trainer_merge").get_by_text("Merge into checkpoint").first.click()
            name = page.locator("#lora_trainer_merge_name textarea")
            expect(name).to_have_value("tiny-sd1+tiny-lora-0.7.safetensors", timeout=30_000)
            expect(page.locator("#lora_trainer_merge_strength input[type=number]")).to_have_value("0.7")
            page.locator("#lora_trainer_merge_button").click()
            merged = models / "tiny-sd1+tiny-lora-0.7.safetensors"
            merge_status = page.locator("#lora_trainer_merge_status textarea")
            expect(merge_status).to_have_value(re.compile(f"^Merged tiny-lora.safetensors at 0.7 into "
                                                          f"tiny-sd1.safetensors: {re.escape(str(merged))} "),
                                               timeout=60_000)
            assert merged.is_file()
            page.locator("#lora_trainer_merge_button").click()  # again: never over the file just written
            expect(merge_status).to_have_value(re.compile("already exists and is never overwritten"), timeout=30_000)
            browser.close()
    finally:
        blocks.close()
    _keep_screenshot(shot)


def test_queue_in_chromium(tmp_path, tiny_sd1, demo_folder):
    """Queue twice from the page: the status follows the queued runs to the end, the queue table shows each run
    done with its report page, and the loss plot is the last run's."""
    assert CHROMIUM, "apt-get install -y chromium (run_tests.sh does it for this stage)"
    from playwright.sync_api import expect, sync_playwright

    from lora_trainer.ui import build_blocks

    runs = tmp_path / "runs"
    blocks = build_blocks(TinyBackend(runs, components=tiny_sd1, sample_steps=2, sample_size=64))
    blocks.queue()
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
            page = browser.new_page(viewport={"width": 1100, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            status = page.locator("#lora_trainer_status textarea")
            page.locator("#lora_trainer_folder textarea").fill(str(demo_folder))
            page.locator("#lora_trainer_trigger textarea").fill("inkwash")
            for name in ("queued-a", "queued-b"):
                page.locator("#lora_trainer_name textarea").fill(name)
                page.locator("#lora_trainer_queue").click()
                expect(status).to_have_value(re.compile(f"Queued run 000. \\({name}\\)|Queue: run"), timeout=30_000)
            expect(status).to_have_value(re.compile("^Queue done: 0001 done, 0002 done\\.\nDone: 3 steps"),
                                         timeout=240_000)
            expect(status).to_have_value(re.compile(f"Report: {re.escape(str(runs / 'queued-b' / 'report.html'))}"))
            expect(page.locator("#lora_trainer_loss img")).to_be_visible()
            page.locator("#lora_trainer_queue_panel").get_by_text("Queue", exact=True).click()
            table = page.locator("#lora_trainer_queue_table")
            for text in ("0001", "queued-a", "0002", "queued-b", "3/3", str(runs / "queued-a" / "report.html")):
                expect(table).to_contain_text(text)
            browser.close()
    finally:
        blocks.close()


def _keep_screenshot(shot: Path) -> None:
    from PIL import Image

    assert shot.stat().st_size > 10_000
    target = os.environ.get("LORA_TRAINER_SCREENSHOT")
    if target:
        img = Image.open(shot).convert("RGB")
        img.thumbnail((900, 1400))
        img.quantize(colors=128).save(target, optimize=True)
        assert Path(target).stat().st_size < 300_000
