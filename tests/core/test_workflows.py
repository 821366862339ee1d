"""The shipped workflows as a user opens them, checked without ComfyUI: the
templates' form (the sampler inside a subgraph), RFC Cache right before the
sampler or guider, a note on what it buys, download addresses for every
model file, consistent links and no overlapping nodes. The host tier checks
them against a real ComfyUI's node definitions (test_pack_host)."""

from __future__ import annotations

import itertools

import pytest

from workflow_graphs import FRONT_END_ONLY, SUBGRAPH_INPUT, SUBGRAPH_OUTPUT, WORKFLOWS, graphs

SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced"}
# What may take RFC Cache's model: the sampler or guider it sits before, and
# a scheduler that reads the model's sigmas.
RIGHT_BEFORE = {"KSampler", "KSamplerAdvanced", "CFGGuider", "BasicGuider", "DualCFGGuider", "BasicScheduler"}
MODEL_FILE_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin")


def test_the_workflows_cover_the_families_people_run():
    names = {path.name for path in WORKFLOWS}
    for expected in ("wan22_image_to_video_two_experts_rfc.json", "flux2_klein_image_edit_kv_cache_rfc.json",
                     "ltx23_image_to_video_rfc.json", "krea2_turbo_text_to_image_rfc.json",
                     "wan21_vace_text_to_video_rfc.json", "minimax_h3_text_to_video_rfc.json"):
        assert expected in names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_the_sampler_sits_inside_a_subgraph(path):
    found, definitions = graphs(path)
    root, subgraphs = found[0], found[1:]
    assert subgraphs, "no subgraph"
    assert not SAMPLERS & {node["type"] for node in root.nodes.values()}
    assert any(SAMPLERS & {node["type"] for node in graph.nodes.values()} for graph in subgraphs)
    instances = [node for node in root.nodes.values() if node["type"] in definitions]
    assert sorted(node["type"] for node in instances) == sorted(definitions)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_rfc_cache_sits_right_before_the_sampler_or_guider(path):
    found, _ = graphs(path)
    rfc_nodes = 0
    for graph in found:
        for node in graph.nodes.values():
            if not node["type"].startswith("RFCCache"):
                continue
            rfc_nodes += 1
            targets = {graph.nodes[target]["type"] for _, origin, _, target, _, _ in graph.links
                       if origin == node["id"]}
            assert targets and targets <= RIGHT_BEFORE, f"RFC Cache {node['id']} feeds {targets}"
            assert targets - {"BasicScheduler"}, "RFC Cache feeds no sampler or guider"
    assert rfc_nodes


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_a_note_says_where_rfc_cache_sits_and_what_it_buys(path):
    root = graphs(path)[0][0]
    notes = [node for node in root.nodes.values() if node["type"] in FRONT_END_ONLY]
    assert notes and "RFC Cache" in notes[0]["widgets_values"][0]
    assert " of " in notes[0]["widgets_values"][0] or "whole model" in notes[0]["widgets_values"][0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_has_a_download_address(path):
    for graph in graphs(path)[0]:
        for node in graph.nodes.values():
            files = [value for value in node.get("widgets_values") or []
                     if isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES)]
            listed = {entry["name"]: entry for entry in node.get("properties", {}).get("models", [])}
            for name in files:
                assert name in listed, f"{node['type']} loads {name} with no download address"
                assert listed[name]["url"].startswith("https://") and listed[name]["url"].endswith(name)
                assert listed[name]["directory"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_agree_at_both_ends(path):
    found, definitions = graphs(path)
    for graph in found:
        for link, origin, origin_slot, target, target_slot, kind in graph.links:
            if origin == SUBGRAPH_INPUT:
                entry = graph.inputs[origin_slot]
                assert link in entry["linkIds"] and entry["type"] == kind
            else:
                output = graph.nodes[origin]["outputs"][origin_slot]
                assert link in output["links"] and output["type"] == kind, (graph.name, link)
            if target == SUBGRAPH_OUTPUT:
                entry = graph.outputs[target_slot]
                assert link in entry["linkIds"] and entry["type"] == kind
            else:
                entry = graph.nodes[target]["inputs"][target_slot]
                assert entry["link"] == link and entry["type"] == kind, (graph.name, link)
        ids = {link[0] for link in graph.links}
        for node in graph.nodes.values():
            assert all(entry["link"] in ids for entry in node["inputs"] if entry["link"] is not None)
            assert all(set(entry["links"]) <= ids for entry in node["outputs"])
            if node["type"] in definitions:  # an instance: its slots are the definition's
                definition = definitions[node["type"]]
                assert [e["type"] for e in node["inputs"]] == [e["type"] for e in definition["inputs"]]
                assert [e["type"] for e in node["outputs"]] == [e["type"] for e in definition["outputs"]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap(path):
    for graph in graphs(path)[0]:
        boxes = [(node["id"], *node["pos"], node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
                 for node in graph.nodes.values()]
        for (a, ax, ay, ax2, ay2), (b, bx, by, bx2, by2) in itertools.combinations(boxes, 2):
            assert ax2 <= bx or bx2 <= ax or ay2 <= by or by2 <= ay, f"{graph.name}: nodes {a} and {b} overlap"
