"""The pack in ComfyUI's real frontend (comfyui-frontend-package 1.35.9), in headless Debian chromium.

Each example UI graph loads with no missing node and every widget of our nodes (in the merge graph, of every node)
holding the value the file gives; a screenshot of its canvas is taken (COMFYUI_SCREENSHOTS=example_workflows keeps
them as the templates' thumbnails, <name>.jpg). A fresh
Train LoRA node is checked the way a user meets it: its seed's "control after generate" mode, and
a learning rate typed into the widget's prompt dialog.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--headless=new", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
OURS = ("LoraTrainerCaptionFolder", "LoraTrainerTrain", "LoraTrainerStrengthGrid")
# each example UI graph: the node types whose widgets are checked against the file (None: every node)
UI_GRAPHS = {"caption_train_sample.json": OURS, "merge_lora_into_checkpoint.json": None,
             "flux_train_sample.json": ("LoraTrainerTrainFlux", "LoraTrainerCheckDataset", "DualCLIPLoader",
                                        "FluxGuidance", "KSampler")}
MISSING_NODES_DIALOG = ".p-dialog[aria-labelledby='global-missing-nodes']"  # 1.35.9's "This workflow has missing nodes"
EMPTY_GRAPH = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
               "extra": {}, "version": 0.4}


class Browser:
    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []  # uncaught page errors
        self.failed: list[str] = []  # responses >= 400
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))

    def load(self, graph: dict) -> None:
        """What dropping a workflow file does, once the file is read: app.loadGraphData."""
        self.page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
        self.page.wait_for_timeout(500)  # the missing-nodes dialog opens after the load resolves


def _graph_on_screen(page, margin: int = 24) -> dict:
    """The page area the graph's nodes (with their titles) cover, as the view shows them now."""
    return page.evaluate("""(margin) => {
        const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), title = window.LiteGraph.NODE_TITLE_HEIGHT;
        const xs = [], ys = [];
        for (const n of window.app.graph.nodes) {
            for (const [x, y] of [[n.pos[0], n.pos[1] - title], [n.pos[0] + n.size[0], n.pos[1] + n.size[1]]]) {
                const [cx, cy] = c.ds.convertOffsetToCanvas([x, y]);
                xs.push(r.left + cx / devicePixelRatio); ys.push(r.top + cy / devicePixelRatio);
            }
        }
        const x = Math.max(r.left, Math.min(...xs) - margin), y = Math.max(r.top, Math.min(...ys) - margin);
        return {x, y, width: Math.min(r.right, Math.max(...xs) + margin) - x,
                height: Math.min(r.bottom, Math.max(...ys) + margin) - y};
    }""", margin)


@pytest.fixture(scope="module")
def browser(comfy_server):
    assert CHROMIUM, "apt-get install -y chromium (run_tests.sh does it for this stage)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        b = Browser(chromium.new_page(viewport={"width": 1600, "height": 1000}))
        b.page.goto(comfy_server.url + "/")
        b.page.wait_for_function("() => window.app?.graph && window.app.canvas && window.LiteGraph"
                                 " && window.LiteGraph.registered_node_types?.LoraTrainerTrain", timeout=120_000)
        yield b
        chromium.close()


@pytest.mark.parametrize("ui_graph", list(UI_GRAPHS))
def test_example_graph_loads_with_its_widget_values(browser, example_workflow, tmp_path, ui_graph):
    page = browser.page
    # The check below would see the dialog: a graph with an unknown node opens it.
    browser.load({**EMPTY_GRAPH, "last_node_id": 1, "nodes": [
        {"id": 1, "type": "NoSuchNodeForThisTest", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 0,
         "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}]})
    dialog = page.locator(MISSING_NODES_DIALOG)
    dialog.wait_for(timeout=10_000)
    assert "NoSuchNodeForThisTest" in dialog.inner_text()
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached", timeout=10_000)

    workflow = example_workflow(ui_graph)
    browser.load(workflow)
    assert page.locator(MISSING_NODES_DIALOG).count() == 0, page.locator(MISSING_NODES_DIALOG).inner_text()
    graph = page.evaluate("""() => {
        const g = window.app.graph, links = g.links;
        return {nodes: g.nodes.length, links: links instanceof Map ? links.size : Object.keys(links).length,
                widgets: Object.fromEntries(g.nodes.map(n => [n.id, (n.widgets ?? []).map(w => [w.name, w.value])]))};
    }""")
    assert (graph["nodes"], graph["links"]) == (len(workflow["nodes"]), len(workflow["links"]))
    keep = os.environ.get("COMFYUI_SCREENSHOTS")
    shot = Path(keep) / Path(ui_graph).with_suffix(".jpg").name if keep else tmp_path / "comfyui_graph.png"
    page.screenshot(path=str(shot), clip=_graph_on_screen(page))
    assert shot.stat().st_size > 20_000

    mismatched = []
    checked = UI_GRAPHS[ui_graph]
    for node in workflow["nodes"]:
        if checked is not None and node["type"] not in checked:
            continue
        live, saved = graph["widgets"][str(node["id"])], node["widgets_values"]
        for i in range(max(len(live), len(saved))):
            name, value = live[i] if i < len(live) else ("<no widget>", "<none>")
            in_file = saved[i] if i < len(saved) else "<not in the file>"
            if value != in_file:
                mismatched.append(f"{node['type']} #{node['id']} widget {i} {name}: file {in_file!r}, "
                                  f"frontend {value!r}")
    assert not mismatched, f"after loading {ui_graph}:\n" + "\n".join(mismatched)
    assert not browser.errors, browser.errors
    assert not [f for f in browser.failed if "/extensions/" in f], browser.failed


def test_a_fresh_train_node_as_a_user_meets_it(browser, capsys):
    page = browser.page
    browser.load(EMPTY_GRAPH)
    fresh = page.evaluate("""() => {
        const add = (type, pos) => { const n = window.LiteGraph.createNode(type); window.app.graph.add(n);
                                     n.pos = pos; return n; };
        const train = add("LoraTrainerTrain", [300, 100]), ksampler = add("KSampler", [800, 100]);
        const c = window.app.canvas;
        c.ds.scale = 1; c.ds.offset = [0, 0]; c.setDirty(true, true); c.draw(true, true);
        const control = n => n.widgets.find(w => w.name === "control_after_generate")?.value;
        const w = train.widgets.find(w => w.name === "learning_rate"), r = c.canvas.getBoundingClientRect();
        const [x, y] = c.ds.convertOffsetToCanvas([train.pos[0] + train.size[0] / 2,
                                                  train.pos[1] + w.y + (w.computedHeight ?? 20) / 2]);
        return {id: train.id, train_seed_control: control(train), ksampler_seed_control: control(ksampler),
                learning_rate_options: w.options, x: r.left + x / devicePixelRatio, y: r.top + y / devicePixelRatio};
    }""")
    # As a user does: a click in the middle of the number widget opens its prompt; type, Enter.
    page.mouse.click(fresh["x"], fresh["y"])
    value = page.locator(".graphdialog input")
    value.fill("0.000025")
    value.press("Enter")
    typed = page.evaluate("""(id) => {
        const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === "learning_rate");
        return {value: w.value, shown: w._displayValue};
    }""", fresh["id"])
    with capsys.disabled():
        print(f"\nfresh LoraTrainerTrain: seed control {fresh['train_seed_control']!r} (a fresh KSampler's: "
              f"{fresh['ksampler_seed_control']!r}); learning_rate options {fresh['learning_rate_options']}; "
              f"typed 0.000025 -> value {typed['value']!r}, shown {typed['shown']!r}")
    assert typed["value"] == 0.000025, typed
    assert fresh["train_seed_control"] == "fixed", fresh
    # What the node returns in ui.text (as ComfyUI's "executed" message hands it to onExecuted) shows on it
    shown = page.evaluate("""(id) => {
        const node = window.app.graph.getNodeById(id);
        node.onExecuted({text: ["saved village-v2.safetensors in models/loras\\n500 steps, final loss 0.1234"]});
        window.app.canvas.setDirty(true, true);
        const box = node.widgets.find(w => w.name === "result");
        return {value: box?.value, saved: node.serialize().widgets_values};
    }""", fresh["id"])
    # the frontend mounts a DOM widget's element on a later frame
    page.wait_for_function("""(id) => window.app.graph.getNodeById(id).widgets.find(w => w.name === "result")
                              ?.element?.isConnected""", arg=fresh["id"], timeout=10_000)
    assert shown["value"] == "saved village-v2.safetensors in models/loras\n500 steps, final loss 0.1234", shown
    assert not any("village-v2" in str(v) for v in shown["saved"]), shown  # never saved into the workflow
