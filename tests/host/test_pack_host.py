"""The pack as ComfyUI sees it: registration, front-end folder, shipped workflows."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow_graphs import FRONT_END_ONLY, WORKFLOWS, graphs


def test_nodes_and_web_directory_are_registered(comfy):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RFCCache"] == "RFC Cache"
    assert "RFCCacheAdvanced" in nodes.NODE_CLASS_MAPPINGS
    web_dirs = {name: Path(path) for name, path in nodes.EXTENSION_WEB_DIRS.items()}
    assert (web_dirs["ComfyUI-RFC"] / "rfc_cache.js").is_file()


# The workflows follow the templates of late 2026, written against v0.31:
# an older ComfyUI lacks some of their nodes (the If/Else switch, 2026
# models' loaders) or the loader types of models added in 2026, and such a
# workflow is skipped there, saying which.
NEWEST_TESTED_COMFYUI = (0, 31)
WORKFLOWS_FOR_2026_MODELS = {
    "flux2_dev_text_to_image_rfc.json", "flux2_klein_text_to_image_rfc.json",
    "flux2_klein_image_edit_kv_cache_rfc.json", "z_image_text_to_image_rfc.json",
    "z_image_turbo_text_to_image_rfc.json", "ltx2_text_to_video_with_audio_rfc.json", "ltx23_image_to_video_rfc.json",
    "hunyuan_video_15_text_to_video_rfc.json", "qwen_image_edit_2511_rfc.json", "krea2_turbo_text_to_image_rfc.json",
    "minimax_h3_text_to_video_rfc.json",
}
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
# An input or output whose type is whatever is linked to it (the If/Else switch).
MATCH_TYPE = "COMFY_MATCHTYPE_V3"
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def comfyui_version() -> tuple[int, ...]:
    import comfyui_version as version_module

    return tuple(int(part) for part in version_module.__version__.split(".")[:2])


def widget_inputs(node_class) -> list[tuple[str, tuple]]:
    """The node's widget inputs in the order the front-end lists their
    values: required, then optional; links and hidden inputs are not widgets."""
    inputs = node_class.INPUT_TYPES()
    found = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, list) or str(kind).split(",")[0] in (
                    "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3"):
                found.append((name, spec))
    return found


def combo_options(spec) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    options = (spec[1] if len(spec) > 1 else {}).get("options", [])
    return [option["key"] if isinstance(option, dict) else option for option in options]


def check_widget_value(where: str, spec, value) -> None:
    kind = spec[0] if not isinstance(spec[0], list) else "COMBO"
    options = spec[1] if len(spec) > 1 else {}
    kinds = str(kind).split(",")
    if "INT" in kinds or "FLOAT" in kinds:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        if kinds == ["INT"]:
            assert isinstance(value, int), f"{where}: {value!r} is not an integer"
        assert options.get("min", value) <= value <= options.get("max", value), \
            f"{where}: {value} outside {options.get('min')} to {options.get('max')}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    else:
        allowed = combo_options(spec)
        # Model files are the user's to download: a machine without them lists none.
        if not str(value).endswith(MODEL_FILE_SUFFIXES):
            assert value in allowed, f"{where}: {value!r} is not one of {allowed[:8]}"


def check_node(node: dict, node_class) -> None:
    where = f"node {node['id']} ({node['type']})"
    linked = {entry["name"] for entry in node.get("inputs", []) if entry.get("link") is not None}
    values = list(node.get("widgets_values") or [])
    position = 0
    for name, spec in widget_inputs(node_class):
        if name in linked:
            continue
        if position == len(values) and "default" in (spec[1] if len(spec) > 1 else {}):
            # A widget a newer ComfyUI added after the workflow was saved: the
            # front-end gives it its default.
            continue
        assert position < len(values), f"{where}: no value for widget {name!r}"
        check_widget_value(f"{where}, widget {name!r}", spec, values[position])
        position += 1
        if len(spec) > 1 and spec[1].get("control_after_generate"):
            assert values[position] in SEED_CONTROLS, f"{where}: {values[position]!r} after {name!r}"
            position += 1
    assert position == len(values), f"{where}: {len(values)} widget values for {position} widgets"


def declared_input_types(node_class) -> dict:
    inputs = node_class.INPUT_TYPES()
    return {name: str(spec[0]) for section in ("required", "optional") for name, spec in inputs.get(section, {}).items()}


def output_type(node_class, node: dict, slot: int) -> str:
    """What an output slot carries: declared, or for a template output (the
    If/Else switch's) the type the workflow resolved it to."""
    declared = str(node_class.RETURN_TYPES[slot])
    return node["outputs"][slot]["type"] if declared == MATCH_TYPE else declared


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_this_comfyuis_nodes(comfy, workflow):
    """In the root graph and every subgraph: every node type exists; every
    link joins an output and an input of the type the real node definitions
    give those slots (or a subgraph's own inputs and outputs of that type);
    every widget value is valid for its widget (numbers in range, choices
    among the options)."""
    import nodes

    if workflow.name in WORKFLOWS_FOR_2026_MODELS and comfyui_version() < NEWEST_TESTED_COMFYUI:
        pytest.skip(f"{workflow.name}: a model this ComfyUI predates")
    found, definitions = graphs(workflow)
    missing = {node["type"] for graph in found for node in graph.nodes.values()
               if node["type"] not in FRONT_END_ONLY and node["type"] not in definitions} - set(nodes.NODE_CLASS_MAPPINGS)
    if missing and comfyui_version() < NEWEST_TESTED_COMFYUI:
        pytest.skip(f"{workflow.name} needs nodes this ComfyUI predates: {sorted(missing)}")
    assert not missing, f"{workflow.name} uses node types ComfyUI does not have: {missing}"
    rfc_nodes = []
    for graph in found:
        run_nodes = {node_id: node for node_id, node in graph.nodes.items()
                     if node["type"] not in FRONT_END_ONLY and node["type"] not in definitions}
        for link_id, source, source_slot, target, target_slot, link_type in graph.links:
            where = f"{graph.name}, link {link_id}"
            if source in run_nodes:
                source_class = nodes.NODE_CLASS_MAPPINGS[run_nodes[source]["type"]]
                assert output_type(source_class, run_nodes[source], source_slot) == link_type, where
            if target in run_nodes:
                target_input = run_nodes[target]["inputs"][target_slot]
                accepted = declared_input_types(nodes.NODE_CLASS_MAPPINGS[run_nodes[target]["type"]])[
                    target_input["name"]]
                assert link_type in accepted.split(",") or accepted in ("*", MATCH_TYPE), \
                    f"{where}: {run_nodes[target]['type']}.{target_input['name']} takes {accepted}, not {link_type}"
        for node in run_nodes.values():
            check_node(node, nodes.NODE_CLASS_MAPPINGS[node["type"]])
        rfc_nodes += [node for node in run_nodes.values() if node["type"].startswith("RFCCache")]
    assert rfc_nodes, f"{workflow.name} has no RFC Cache node"
    for node in rfc_nodes:
        node_class = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        widget_names = [name for name in node_class.INPUT_TYPES()["required"] if name != "model"]
        # Positional: widgets of the first release keep their places.
        assert widget_names[:5] == ["threshold", "max_skip", "order", "start_percent", "end_percent"]
        config_module = __import__(node_class.__module__, fromlist=["CacheConfig"])
        widgets = dict(zip(widget_names, node["widgets_values"]))
        assert widgets.pop("granularity", "auto") in ("auto", "model")
        config_module.CacheConfig(**widgets)
