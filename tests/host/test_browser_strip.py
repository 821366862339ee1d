"""The front-end, for real: a ComfyUI server on localhost with the pack, an
RFC workflow queued through ComfyUI's own front-end in headless Chromium,
and the strip the pack's extension draws on the RFC Cache node checked
against the run. RFC_SCREENSHOT=path keeps a screenshot of it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STEPS = 20
TARGET = 2.5
# Without these Chromium keeps calling out to Google's hosts, which this
# machine's closed network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _requirements() -> str | None:
    if not Path(CHROMIUM).exists():
        return "browser test: no Chromium (apt-get install chromium)"
    for module, package in (("playwright", "playwright"), ("comfyui_frontend_package", "comfyui-frontend-package")):
        try:
            __import__(module)
        except ImportError:
            return f"browser test: pip install {package}"
    return None


pytestmark = pytest.mark.skipif(_requirements() is not None, reason=_requirements() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-RFC").symlink_to(REPO_ROOT, target_is_directory=True)
    (custom_nodes / "rfc_browser_fixture").symlink_to(REPO_ROOT / "tests" / "host" / "browser_fixture",
                                                      target_is_directory=True)
    port = _free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(base), "--disable-auto-launch"], cwd=os.environ["COMFYUI_PATH"], stdout=log,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/object_info/RFCTestTinyFluxLoader", timeout=5) as reply:
                    if "RFCTestTinyFluxLoader" in reply.read().decode():
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)


def _node(id_, type_, pos, widgets, inputs=(), outputs=()):
    return {"id": id_, "type": type_, "pos": pos, "size": [300, 120], "flags": {}, "order": id_ - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links, "slot_index": i}
                        for i, (n, t, links) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": widgets}


def _graph(nodes: list, links: list) -> dict:
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max(link[0] for link in links),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


RFC_WIDGETS = [0.1, 3, 1, 0.0, 1.0, TARGET]


def _bundled_model_and_prompt() -> list:
    """Nodes 1 and 2 of both layouts: the model on link 1, the prompts and latent on links 3 to 5."""
    return [_node(1, "RFCTestTinyFluxLoader", [20, 40], [], outputs=[("MODEL", "MODEL", [1])]),
            _node(2, "RFCTestTinyFluxPrompt", [20, 260], [3], outputs=[("positive", "CONDITIONING", [3]),
                                                                        ("negative", "CONDITIONING", [4]),
                                                                        ("latent", "LATENT", [5])])]


def _workflow() -> dict:
    """Loader -> RFC Cache -> KSampler, all in the root graph."""
    nodes = [
        *_bundled_model_and_prompt(),
        _node(3, "RFCCache", [360, 40], RFC_WIDGETS, inputs=[("model", "MODEL", 1)],
              outputs=[("MODEL", "MODEL", [2])]),
        _node(4, "KSampler", [720, 40], [0, "fixed", STEPS, 3.0, "euler", "simple", 1.0],
              inputs=[("model", "MODEL", 2), ("positive", "CONDITIONING", 3), ("negative", "CONDITIONING", 4),
                      ("latent_image", "LATENT", 5)], outputs=[("LATENT", "LATENT", [6])]),
        _node(5, "SaveLatent", [1060, 40], ["latents/rfc_browser_test"], inputs=[("samples", "LATENT", 6)]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 3, 0, 4, 0, "MODEL"], [3, 2, 0, 4, 1, "CONDITIONING"],
             [4, 2, 1, 4, 2, "CONDITIONING"], [5, 2, 2, 4, 3, "LATENT"], [6, 4, 0, 5, 0, "LATENT"]]
    return _graph(nodes, links)


# The nodes that become the subgraph in the template layout.
SAMPLING_NODES = [3, 4, 5, 6, 7, 8]


def _guider_workflow() -> dict:
    """The official templates' layout: the sampler behind a guider, with RFC
    Cache right before the guider; SAMPLING_NODES are then turned into a
    subgraph, as the templates ship them."""
    nodes = [
        *_bundled_model_and_prompt(),
        _node(3, "RFCCache", [360, 40], RFC_WIDGETS, inputs=[("model", "MODEL", 1)],
              outputs=[("MODEL", "MODEL", [2, 7])]),
        _node(4, "CFGGuider", [720, 40], [3.0],
              inputs=[("model", "MODEL", 2), ("positive", "CONDITIONING", 3), ("negative", "CONDITIONING", 4)],
              outputs=[("GUIDER", "GUIDER", [8])]),
        _node(5, "KSamplerSelect", [720, 220], ["euler"], outputs=[("SAMPLER", "SAMPLER", [9])]),
        _node(6, "BasicScheduler", [720, 340], ["simple", STEPS, 1.0], inputs=[("model", "MODEL", 7)],
              outputs=[("SIGMAS", "SIGMAS", [10])]),
        _node(7, "RandomNoise", [720, 500], [0, "fixed"], outputs=[("NOISE", "NOISE", [11])]),
        _node(8, "SamplerCustomAdvanced", [1060, 40], [],
              inputs=[("noise", "NOISE", 11), ("guider", "GUIDER", 8), ("sampler", "SAMPLER", 9),
                      ("sigmas", "SIGMAS", 10), ("latent_image", "LATENT", 5)],
              outputs=[("output", "LATENT", [6]), ("denoised_output", "LATENT", [])]),
        _node(9, "SaveLatent", [1400, 40], ["latents/rfc_browser_test"], inputs=[("samples", "LATENT", 6)]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 3, 0, 4, 0, "MODEL"], [3, 2, 0, 4, 1, "CONDITIONING"],
             [4, 2, 1, 4, 2, "CONDITIONING"], [5, 2, 2, 8, 4, "LATENT"], [6, 8, 0, 9, 0, "LATENT"],
             [7, 3, 0, 6, 0, "MODEL"], [8, 4, 0, 8, 1, "GUIDER"], [9, 5, 0, 8, 2, "SAMPLER"],
             [10, 6, 0, 8, 3, "SIGMAS"], [11, 7, 0, 8, 0, "NOISE"]]
    return _graph(nodes, links)


def test_the_server_describes_the_node_with_tooltips_and_search_aliases(server):
    """What ComfyUI's own node_info makes of the V1 definition: tooltips on
    every widget and the output, and from v0.29 on the search aliases."""
    import json

    url, _ = server
    with urllib.request.urlopen(f"{url}/object_info/RFCCache", timeout=10) as reply:
        info = json.loads(reply.read().decode())["RFCCache"]
    widgets = {name: spec for name, spec in info["input"]["required"].items() if name != "model"}
    assert all(spec[1].get("tooltip") for spec in widgets.values())
    assert info["output_tooltips"] and info["output_tooltips"][0]
    if "search_aliases" in info:
        assert "teacache" in info["search_aliases"]


class _Page:
    """ComfyUI's front-end in headless Chromium, with the node definitions loaded."""

    def __init__(self, playwright, url):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 700})
        self.page.goto(url)
        # The graph exists before the node definitions arrive; a workflow
        # loaded earlier has only unknown nodes and queues nothing.
        self.page.wait_for_function("() => window.app?.graph && ['RFCCache', 'SaveLatent', 'RFCTestTinyFluxLoader']"
                                    ".every((type) => window.LiteGraph?.registered_node_types?.[type])",
                                    timeout=120_000)

    def load(self, workflow: dict) -> None:
        self.page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
        self.page.keyboard.press("Escape")

    def queue(self) -> None:
        self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")

    def strip(self) -> dict:
        """What the strip on screen shows."""
        page = self.page
        page.wait_for_selector("svg.rfc-strip rect", timeout=300_000)
        return {"cells": page.locator("svg.rfc-strip rect").count(),
                "computed": page.locator("svg.rfc-strip rect.rfc-computed").count(),
                "summary": page.locator(".rfc-summary").inner_text(),
                "line_points": page.locator("svg.rfc-strip polyline.rfc-line").get_attribute("points")}

    def screenshot(self, path: Path, scale: float = 1.25, offset: tuple[int, int] = (10, 10)) -> None:
        self.page.evaluate("([scale, offset]) => { const c = window.app.canvas; c.ds.scale = scale;"
                           " c.ds.offset = offset; c.setDirty(true, true); }", [scale, list(offset)])
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path))


def _check_strip(shown: dict, log_path: Path) -> None:
    assert shown["cells"] == STEPS
    assert shown["computed"] == round(STEPS / TARGET)
    computed = shown["computed"]
    assert shown["summary"].startswith(f"{computed} of {STEPS} computed, {STEPS / computed:.1f}x fewer "
                                       f"(target {TARGET}x), cache ")
    assert len(shown["line_points"].split()) == STEPS
    # The server's own account of the run says the same.
    server_log = log_path.read_text()
    assert f"computed {computed} of {STEPS} model evaluations" in server_log, server_log[-3000:]


def test_the_rfc_node_shows_the_run_it_drove(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, log_path = server
    with sync_playwright() as playwright:
        view = _Page(playwright, url)
        try:
            view.load(_workflow())
            view.queue()
            shown = view.strip()
            view.screenshot(Path(os.environ.get("RFC_SCREENSHOT", tmp_path / "rfc_strip.png")))
        finally:
            view.browser.close()
    _check_strip(shown, log_path)


def test_the_rfc_node_inside_a_subgraph_shows_its_run(server, tmp_path):
    """The templates' layout: RFC Cache right before the guider, inside the
    subgraph that holds the sampler. The server names the node by its path
    ("10:3"); the strip must find it there and draw when the subgraph is
    opened."""
    from playwright.sync_api import sync_playwright

    url, log_path = server
    with sync_playwright() as playwright:
        view = _Page(playwright, url)
        try:
            view.load(_guider_workflow())
            instance = view.page.evaluate(
                "(ids) => { const graph = window.app.graph;"
                " const converted = graph.convertToSubgraph(new Set(ids.map((id) => graph.getNodeById(id))));"
                " return converted.node.id; }", SAMPLING_NODES)
            in_root = view.page.evaluate("() => window.app.graph.nodes.map((node) => node.type)")
            assert "RFCCache" not in in_root and "SamplerCustomAdvanced" not in in_root, in_root
            view.page.evaluate("() => { window.rfcSent = []; window.comfyAPI.api.api.addEventListener("
                               "'rfc-cache.summary', ({ detail }) => window.rfcSent.push(String(detail.node))); }")
            view.queue()
            # Drawn on the node inside the subgraph while the root graph is on screen ...
            view.page.wait_for_function(
                "(instance) => window.app.graph.getNodeById(instance).subgraph.nodes"
                ".find((node) => node.type === 'RFCCache')?.widgets?.find((w) => w.name === 'rfc_last_run')",
                arg=instance, timeout=300_000)
            # ... and shown when the user opens the subgraph.
            view.page.evaluate("(instance) => { const node = window.app.graph.getNodeById(instance);"
                               " window.app.canvas.openSubgraph(node.subgraph, node); }", instance)
            shown = view.strip()
            view.screenshot(Path(os.environ.get("RFC_SUBGRAPH_SCREENSHOT", tmp_path / "rfc_subgraph_strip.png")),
                            scale=0.9, offset=(-120, 120))
            sent = view.page.evaluate("() => window.rfcSent")
        finally:
            view.browser.close()
    _check_strip(shown, log_path)
    # The server named the node by its path, subgraph instance first.
    assert sent == [f"{instance}:{SAMPLING_NODES[0]}"] or (len(sent) == 1 and sent[0].startswith(f"{instance}:")), sent


def test_every_workflow_opens_in_the_front_end_with_rfc_cache_before_the_sampler(server):
    """The shipped workflows as a user drags them in: the front-end loads each
    (subgraphs and all) and turns it into the prompt it would queue, where
    RFC Cache must feed the sampler or guider. Workflows with nodes this
    ComfyUI lacks are left out, as the host workflow test says."""
    import json

    from playwright.sync_api import sync_playwright

    from workflow_graphs import FRONT_END_ONLY, WORKFLOWS, graphs

    url, _ = server
    with urllib.request.urlopen(f"{url}/object_info", timeout=60) as reply:
        known = set(json.loads(reply.read().decode()))
    checked = {}
    with sync_playwright() as playwright:
        view = _Page(playwright, url)
        try:
            for path in WORKFLOWS:
                found, definitions = graphs(path)
                types = {node["type"] for graph in found for node in graph.nodes.values()}
                if types - known - set(definitions) - set(FRONT_END_ONLY):
                    continue
                view.load(json.loads(path.read_text()))
                checked[path.name] = view.page.evaluate(
                    "async () => { const { output } = await window.app.graphToPrompt();"
                    " return Object.fromEntries(Object.entries(output).map(([id, node]) =>"
                    " [id, { type: node.class_type, model: node.inputs.model ?? null }])); }")
        finally:
            view.browser.close()
    assert checked, "no workflow could be checked on this ComfyUI"
    for name, prompt in checked.items():
        rfc_ids = [node_id for node_id, node in prompt.items() if node["type"].startswith("RFCCache")]
        assert rfc_ids, f"{name}: no RFC Cache in the prompt"
        # Inside a subgraph the prompt names nodes by their path ("12:5").
        assert all(":" in node_id for node_id in rfc_ids), f"{name}: RFC Cache is not inside a subgraph"
        fed = {prompt[node_id]["type"] for node_id, node in prompt.items()
               for rfc_id in rfc_ids if node["model"] == [rfc_id, 0]}
        assert fed & {"KSampler", "KSamplerAdvanced", "CFGGuider", "BasicGuider"}, f"{name}: RFC Cache feeds {fed}"
    print(f"{len(checked)} workflows opened: {', '.join(sorted(checked))}")
