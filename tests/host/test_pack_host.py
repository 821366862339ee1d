"""The pack as ComfyUI sees it: registration, front-end folder, shipped workflows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_nodes_and_web_directory_are_registered(comfy):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RFCCache"] == "RFC Cache"
    assert "RFCCacheAdvanced" in nodes.NODE_CLASS_MAPPINGS
    web_dirs = {name: Path(path) for name, path in nodes.EXTENSION_WEB_DIRS.items()}
    assert (web_dirs["ComfyUI-RFC"] / "rfc_cache.js").is_file()


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_uses_only_existing_node_types_and_valid_widgets(comfy, workflow):
    import nodes

    graph = json.loads(workflow.read_text())
    types = {node["type"] for node in graph["nodes"]}
    missing = types - set(nodes.NODE_CLASS_MAPPINGS)
    assert not missing, f"{workflow.name} uses node types ComfyUI does not have: {missing}"
    by_id = {node["id"]: node for node in graph["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in graph["links"]:
        assert by_id[source]["outputs"][source_slot]["type"] == link_type
        assert by_id[target]["inputs"][target_slot]["type"] == link_type
    rfc_nodes = [node for node in graph["nodes"] if node["type"].startswith("RFCCache")]
    assert rfc_nodes, f"{workflow.name} has no RFC Cache node"
    for node in rfc_nodes:
        node_class = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        widget_names = [name for name in node_class.INPUT_TYPES()["required"] if name != "model"]
        # Positional: widgets of the first release keep their places.
        assert widget_names[:5] == ["threshold", "max_skip", "order", "start_percent", "end_percent"]
        assert len(widget_names) == len(node["widgets_values"])
        config_module = __import__(node_class.__module__, fromlist=["CacheConfig"])
        widgets = dict(zip(widget_names, node["widgets_values"]))
        assert widgets.pop("granularity", "auto") in ("auto", "model")
        config_module.CacheConfig(**widgets)
