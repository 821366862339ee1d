"""Writes the example workflows in workflows/ in the form of ComfyUI's
official templates (late 2026): the pipeline inside a subgraph, the files the
templates load (fp8_scaled, fp8mixed, int8_convrot), the model download
addresses the Missing Models panel reads, a speed LoRA behind an If/Else
switch where the template has one, two sampling stages where it has them,
and a note saying where RFC Cache sits and what it buys at that step count.

RFC Cache always goes right before the sampler or guider, after every other
model patch (LoRA, ModelSampling, CFGNorm, FluxKVCache, the switch): that is
the one place that is the same in every template.

Node inputs, outputs and widget order are read from a real ComfyUI, so the
files match its node definitions (the host test checks them again):

    COMFYUI_PATH=/path/to/ComfyUI python tools/make_workflows.py

Positions are laid out in columns by depth, so no two nodes overlap.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
NAMESPACE = uuid.UUID("6f1c2a52-6f0b-4f7e-9a53-2f1d9b1c0f11")
MATCH_TYPE = "COMFY_MATCHTYPE_V3"
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3")
# Nodes the front-end draws that the server does not run.
FRONT_END_ONLY = ("MarkdownNote", "Note")
COLUMN_WIDTH, NODE_WIDTH, GAP = 400, 340, 40

HF = "https://huggingface.co"
# Where the Missing Models panel downloads each file from, and into which folder.
MODEL_FILES = {
    "flux1-dev-fp8.safetensors": ("checkpoints", f"{HF}/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors"),
    "flux2_dev_fp8mixed.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/flux2_dev_fp8mixed.safetensors"),
    "mistral_3_small_flux2_fp8.safetensors": ("text_encoders", f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/mistral_3_small_flux2_fp8.safetensors"),
    "flux2-vae.safetensors": ("vae", f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
    "Flux_2-Turbo-LoRA_comfyui.safetensors": ("loras", f"{HF}/ByteZSzn/Flux.2-Turbo-ComfyUI/resolve/main/Flux_2-Turbo-LoRA_comfyui.safetensors"),
    "flux-2-klein-base-4b-fp8.safetensors": ("diffusion_models", f"{HF}/black-forest-labs/FLUX.2-klein-base-4b-fp8/resolve/main/flux-2-klein-base-4b-fp8.safetensors"),
    "flux-2-klein-4b-fp8.safetensors": ("diffusion_models", f"{HF}/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/flux-2-klein-4b-fp8.safetensors"),
    "flux-2-klein-9b-kv-fp8.safetensors": ("diffusion_models", f"{HF}/black-forest-labs/FLUX.2-klein-9b-kv-fp8/resolve/main/flux-2-klein-9b-kv-fp8.safetensors"),
    "qwen_3_4b_fp8_mixed.safetensors": ("text_encoders", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b_fp8_mixed.safetensors"),
    "qwen_3_8b_fp8mixed.safetensors": ("text_encoders", f"{HF}/Comfy-Org/flux2-klein-9B/resolve/main/split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors"),
    "z_image_turbo_bf16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors"),
    "z_image_bf16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors"),
    "ae.safetensors": ("vae", f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"),
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors"),
    "qwen_image_edit_2511_bf16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_edit_2511_bf16.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": ("vae", f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors"),
    "Qwen-Image-Lightning-8steps-V1.0.safetensors": ("loras", f"{HF}/lightx2v/Qwen-Image-Lightning/resolve/main/Qwen-Image-Lightning-8steps-V1.0.safetensors"),
    "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors": ("loras", f"{HF}/lightx2v/Qwen-Image-Edit-2511-Lightning/resolve/main/Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": ("loras", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"),
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": ("loras", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": ("loras", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": ("loras", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"),
    "wan2.1_vace_14B_fp16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_vace_14B_fp16.safetensors"),
    "Wan21_CausVid_14B_T2V_lora_rank32.safetensors": ("loras", f"{HF}/Kijai/WanVideo_comfy/resolve/main/Wan21_CausVid_14B_T2V_lora_rank32.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan_2.1_vae.safetensors": ("vae", f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors"),
    "hunyuan_video_t2v_720p_bf16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"),
    "clip_l.safetensors": ("text_encoders", f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "llava_llama3_fp8_scaled.safetensors": ("text_encoders", f"{HF}/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/text_encoders/llava_llama3_fp8_scaled.safetensors"),
    "hunyuan_video_vae_bf16.safetensors": ("vae", f"{HF}/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files/vae/hunyuan_video_vae_bf16.safetensors"),
    "hunyuanvideo1.5_720p_t2v_fp16.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors"),
    "byt5_small_glyphxl_fp16.safetensors": ("text_encoders", f"{HF}/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/text_encoders/byt5_small_glyphxl_fp16.safetensors"),
    "hunyuanvideo15_vae_fp16.safetensors": ("vae", f"{HF}/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/vae/hunyuanvideo15_vae_fp16.safetensors"),
    "ltx-2-19b-dev-fp8.safetensors": ("checkpoints", f"{HF}/Lightricks/LTX-2/resolve/main/ltx-2-19b-dev-fp8.safetensors"),
    "ltx-2.3-22b-dev-fp8.safetensors": ("checkpoints", f"{HF}/Lightricks/LTX-2.3-fp8/resolve/main/ltx-2.3-22b-dev-fp8.safetensors"),
    "ltx-2.3-22b-distilled-lora-384.safetensors": ("loras", f"{HF}/Lightricks/LTX-2.3/resolve/main/ltx-2.3-22b-distilled-lora-384.safetensors"),
    "gemma_3_12B_it_fp4_mixed.safetensors": ("text_encoders", f"{HF}/Comfy-Org/ltx-2/resolve/main/split_files/text_encoders/gemma_3_12B_it_fp4_mixed.safetensors"),
    "lumina_2.safetensors": ("checkpoints", f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/all_in_one/lumina_2.safetensors"),
    "sd3.5_large_fp8_scaled.safetensors": ("checkpoints", f"{HF}/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/sd3.5_large_fp8_scaled.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "krea2_turbo_fp8_scaled.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/Krea-2/resolve/main/diffusion_models/krea2_turbo_fp8_scaled.safetensors"),
    "qwen3vl_4b_fp8_scaled.safetensors": ("text_encoders", f"{HF}/Comfy-Org/Krea-2/resolve/main/text_encoders/qwen3vl_4b_fp8_scaled.safetensors"),
    "minimax_h3_fl2va_pruned_int8_convrot.safetensors": ("diffusion_models", f"{HF}/Comfy-Org/MiniMax-H3/resolve/main/diffusion_models/minimax_h3_fl2va_pruned_int8_convrot.safetensors"),
    "minimax_h3_fl2v_turbo_8step_v1.0_comfyui_bf16.safetensors": ("loras", f"{HF}/lightx2v/Minimax-h3-Turbo/resolve/main/minimax_h3_fl2v_turbo_8step_v1.0_comfyui_bf16.safetensors"),
    "qwen3vl_32b_minimax_h3_nvfp4_awq.safetensors": ("text_encoders", f"{HF}/Comfy-Org/MiniMax-H3/resolve/main/text_encoders/qwen3vl_32b_minimax_h3_nvfp4_awq.safetensors"),
    "minimax_h3_video_vae_int8_convrot.safetensors": ("vae", f"{HF}/Comfy-Org/MiniMax-H3/resolve/main/vae/minimax_h3_video_vae_int8_convrot.safetensors"),
}

NEGATIVE = ("blurry, low quality, worst quality, jpeg artifacts, deformed hands, extra fingers, watermark, text, "
            "static frame, messy background")


@dataclass
class Port:
    """An output: a node's output slot, or a subgraph input seen from inside."""

    node_id: int
    slot: int
    type: str


@dataclass
class Node:
    id: int
    type: str
    inputs: list  # [name, type, link id or None]
    outputs: list  # [name, type, [link ids]]
    widgets: list
    title: str | None = None
    models: list = field(default_factory=list)
    size: list = field(default_factory=lambda: [NODE_WIDTH, 100])
    pos: list = field(default_factory=lambda: [0, 0])

    def __getitem__(self, output: str) -> Port:
        for slot, (name, kind, _) in enumerate(self.outputs):
            if name == output:
                return Port(self.id, slot, kind)
        raise KeyError(f"{self.type} has no output {output!r}: {[o[0] for o in self.outputs]}")

    def json(self) -> dict:
        entry = {"id": self.id, "type": self.type, "pos": self.pos, "size": self.size, "flags": {}, "order": 0,
                 "mode": 0,
                 "inputs": [{"name": name, "type": kind, "link": link} for name, kind, link in self.inputs],
                 "outputs": [{"name": name, "type": kind, "links": links, "slot_index": slot}
                             for slot, (name, kind, links) in enumerate(self.outputs)],
                 "properties": {"Node name for S&R": self.type}, "widgets_values": self.widgets}
        if self.models:
            entry["properties"]["models"] = [{"name": name, "url": MODEL_FILES[name][1],
                                              "directory": MODEL_FILES[name][0]} for name in self.models]
        if self.title:
            entry["title"] = self.title
        return entry


class Graph:
    """The root graph or one subgraph."""

    def __init__(self, workflow: "Workflow", name: str | None = None):
        self.workflow = workflow
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[tuple] = []  # (id, origin, slot, target, slot, type)
        self.inputs: list[dict] = []  # subgraph inputs: name, type, links inside, the port outside
        self.outputs: list[dict] = []
        # A subgraph's node in the root graph, once placed (Workflow.place).
        self.instance: Node | None = None

    def add(self, type_: str, title: str | None = None, **given) -> Node:
        """A node; keyword arguments are widget values by name (missing ones
        take their defaults) or Ports for its linked inputs."""
        definition = self.workflow.definitions[type_] if type_ not in FRONT_END_ONLY else None
        node = Node(self.workflow.next_node(), type_, [], [], [], title)
        # A template input (the If/Else switch's) takes the type of what is linked to it, and so does its output.
        matched = None
        if definition is None:
            node.widgets = [given.pop("text")]
            node.size = [520, 220]
        else:
            for name, spec, is_widget in definition["inputs"]:
                value = given.pop(name, None)
                if is_widget and not isinstance(value, Port):
                    node.widgets.append(_widget_value(type_, name, spec, value))
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        node.widgets.append("fixed")
                    continue
                if value is None:
                    if not spec[2]:  # optional: may stay unlinked
                        node.inputs.append([name, spec[0], None])
                        continue
                    raise ValueError(f"{type_}: required input {name!r} is not connected")
                if spec[0] in ("*", MATCH_TYPE):
                    matched = value.type
                node.inputs.append([name, value.type if spec[0] in ("*", MATCH_TYPE) else spec[0], None])
                self._link(value, node, len(node.inputs) - 1)
            node.outputs = [[name, matched if kind == MATCH_TYPE else kind, []] for name, kind in definition["outputs"]]
            node.widgets = _without_trailing_defaults(definition, node.widgets, {name for name, _, _ in node.inputs})
            node.models = [value for value in node.widgets if value in MODEL_FILES]
        if given:
            raise ValueError(f"{type_}: no input named {sorted(given)}")
        rows = len(node.widgets) + max(len(node.inputs), len(node.outputs))
        node.size = node.size if definition is None else [NODE_WIDTH, 46 + 24 * rows]
        self.nodes.append(node)
        return node

    def _link(self, port: Port, node: Node, slot: int) -> None:
        link = self.workflow.next_link()
        node.inputs[slot][2] = link
        if port.node_id == -10:
            self.inputs[port.slot]["links"].append(link)
        else:
            self._node(port.node_id).outputs[port.slot][2].append(link)
        self.links.append((link, port.node_id, port.slot, node.id, slot, port.type))

    def _node(self, node_id: int) -> Node:
        return next(node for node in self.nodes if node.id == node_id)

    # Subgraphs: a value from the graph outside, and a value handed back to it.
    def input(self, name: str, outside: Port) -> Port:
        self.inputs.append({"name": name, "type": outside.type, "links": [], "outside": outside})
        return Port(-10, len(self.inputs) - 1, outside.type)

    def output(self, name: str, port: Port) -> None:
        link = self.workflow.next_link()
        self._node(port.node_id).outputs[port.slot][2].append(link)
        self.links.append((link, port.node_id, port.slot, -20, len(self.outputs), port.type))
        self.outputs.append({"name": name, "type": port.type, "links": [link]})

    def lay_out(self, left: int = 0) -> None:
        """Columns by the longest path from a source, stacked without overlap."""
        depth = {node.id: 0 for node in self.nodes}
        for _ in self.nodes:
            for _, origin, _, target, _, _ in self.links:
                if origin in depth and target in depth:
                    depth[target] = max(depth[target], depth[origin] + 1)
        # A source (loader, number) goes in the column right before its first consumer.
        targets: dict[int, list[int]] = {}
        for _, origin, _, target, _, _ in self.links:
            if origin in depth and target in depth:
                targets.setdefault(origin, []).append(target)
        fed = {target for _, _, _, target, _, _ in self.links}
        for node in self.nodes:
            if node.id not in fed and node.id in targets:
                depth[node.id] = max(0, min(depth[target] for target in targets[node.id]) - 1)
        tops: dict[int, int] = {}
        for node in self.nodes:
            column = depth[node.id]
            top = tops.get(column, 0)
            node.pos = [left + column * COLUMN_WIDTH, top]
            tops[column] = top + node.size[1] + GAP

    def bounds(self) -> tuple[int, int, int, int]:
        right = max(node.pos[0] + node.size[0] for node in self.nodes)
        bottom = max(node.pos[1] + node.size[1] for node in self.nodes)
        return min(node.pos[0] for node in self.nodes), 0, right, bottom


class Workflow:
    def __init__(self, file_name: str, definitions: dict):
        self.file_name = file_name
        self.definitions = definitions
        self._node_id = 0
        self._link_id = 0
        self.root = Graph(self)
        self.subgraphs: list[Graph] = []

    def next_node(self) -> int:
        self._node_id += 1
        return self._node_id

    def next_link(self) -> int:
        self._link_id += 1
        return self._link_id

    def subgraph(self, name: str) -> Graph:
        graph = Graph(self, name)
        self.subgraphs.append(graph)
        return graph

    def place(self, graph: Graph) -> Node:
        """The subgraph's instance in the root graph, wired to the ports its inputs came from."""
        uid = str(uuid.uuid5(NAMESPACE, f"{self.file_name}/{graph.name}"))
        instance = Node(self.next_node(), uid, [], [], [], graph.name)
        for entry in graph.inputs:
            instance.inputs.append([entry["name"], entry["type"], None])
            self.root._link(entry["outside"], instance, len(instance.inputs) - 1)
        instance.outputs = [[entry["name"], entry["type"], []] for entry in graph.outputs]
        instance.size = [NODE_WIDTH, 46 + 24 * max(len(instance.inputs), len(instance.outputs), 1)]
        self.root.nodes.append(instance)
        graph.instance = instance
        return instance

    def json(self) -> dict:
        for graph in self.subgraphs:
            graph.lay_out()
        notes = [node for node in self.root.nodes if node.type in FRONT_END_ONLY]
        self.root.lay_out(left=0)
        # The notes above the pipeline, side by side.
        for number, note in enumerate(notes):
            note.pos = [number * (note.size[0] + GAP), -note.size[1] - 2 * GAP]
        definitions = []
        for graph in self.subgraphs:
            instance = graph.instance
            left, top, right, bottom = graph.bounds()
            definitions.append({
                "id": instance.type, "version": 1,
                "state": {"lastGroupId": 0, "lastNodeId": self._node_id, "lastLinkId": self._link_id,
                          "lastRerouteId": 0},
                "revision": 0, "config": {}, "name": graph.name,
                "inputNode": {"id": -10, "bounding": [left - 260, 0, 160, 40 + 24 * len(graph.inputs)]},
                "outputNode": {"id": -20, "bounding": [right + 100, 0, 160, 40 + 24 * len(graph.outputs)]},
                "inputs": [{"id": str(uuid.uuid5(NAMESPACE, f"{instance.type}/in/{entry['name']}")),
                            "name": entry["name"], "type": entry["type"], "linkIds": entry["links"],
                            "localized_name": entry["name"], "pos": [left - 120, 20 + 24 * number]}
                           for number, entry in enumerate(graph.inputs)],
                "outputs": [{"id": str(uuid.uuid5(NAMESPACE, f"{instance.type}/out/{entry['name']}")),
                             "name": entry["name"], "type": entry["type"], "linkIds": entry["links"],
                             "localized_name": entry["name"], "pos": [right + 120, 20 + 24 * number]}
                            for number, entry in enumerate(graph.outputs)],
                "widgets": [], "nodes": [node.json() for node in graph.nodes], "groups": [],
                "links": [{"id": link, "origin_id": origin, "origin_slot": out_slot, "target_id": target,
                           "target_slot": in_slot, "type": kind}
                          for link, origin, out_slot, target, in_slot, kind in graph.links],
                "extra": {}})
        return {"id": str(uuid.uuid5(NAMESPACE, self.file_name)), "revision": 0, "last_node_id": self._node_id,
                "last_link_id": self._link_id, "nodes": [node.json() for node in self.root.nodes],
                "links": [list(link) for link in self.root.links], "groups": [],
                "definitions": {"subgraphs": definitions}, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [60, 420]}}, "version": 0.4}


def _without_trailing_defaults(definition: dict, values: list, linked: set) -> list:
    """Widget values without the optional widgets at the end that keep their
    default: a ComfyUI older than the one that wrote the file may not have
    those widgets (CreateVideo's bit_depth), and a newer front-end fills in
    the default for a value that is not there."""
    values = list(values)
    widgets = [(name, spec) for name, spec, is_widget in definition["inputs"] if is_widget and name not in linked]
    for name, spec in reversed(widgets):
        options = spec[1]
        if spec[2] or options.get("control_after_generate") or not values or values[-1] != options.get("default"):
            break
        values.pop()
    return values


def _widget_value(type_: str, name: str, spec, value):
    if value is not None:
        return value
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list) and spec[0]:
        return spec[0][0]
    raise ValueError(f"{type_}: widget {name!r} needs a value")


def node_definitions(nodes_module) -> dict:
    """Per node type: inputs in the front-end's order as (name, (type or
    options, options, required), is widget), and outputs as (name, type)."""
    definitions = {}
    for type_, node_class in nodes_module.NODE_CLASS_MAPPINGS.items():
        try:
            declared = node_class.INPUT_TYPES()
        except Exception:
            continue
        inputs = []
        for section in ("required", "optional"):
            for name, spec in declared.get(section, {}).items():
                kind = spec[0]
                is_widget = isinstance(kind, list) or str(kind).split(",")[0] in WIDGET_KINDS
                options = spec[1] if len(spec) > 1 else {}
                inputs.append((name, (kind if isinstance(kind, list) else str(kind), options, section == "required"),
                               is_widget))
        names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
        definitions[type_] = {"inputs": inputs, "outputs": [(str(n), str(t)) for n, t in
                                                             zip(names, node_class.RETURN_TYPES)]}
    return definitions


# What RFC Cache buys on each kind of run, for the notes (README "Settings per model").
FULL_STEPS = ("**RFC Cache sits right before the {where}**, after every other model patch. At {steps} steps "
              "the defaults (threshold 0.1, max_skip 3) computed about {computed} of {steps} evaluations on the "
              "pack's benchmark models; the node shows how many your run computed.")
# The node's short-run policy (nodes/runtime/session.py, README "Few-step and noise-adding samplers").
FEW_STEP_RUN = ("RFC Cache recognises the short run and uses its few-step mode: the first third of the blocks "
                "computed in every evaluation, at most every other evaluation predicted, the last computed. On the "
                "pack's distilled benchmark model at 8 steps that is 0.83 of the block computations at the default "
                "threshold, 0.75 at threshold 0.3, both above sampling with 6 steps.")
UNCACHED_SHORT_RUN = ("RFC Cache leaves a run that short uncached by itself (below 6 steps every cache measured "
                      "lost to sampling with fewer steps) and says so on the node.")


def speed_lora(lora: str, fast_steps: int) -> str:
    """The note on a speed-LoRA switch that turns the run into a few-step one."""
    return (f"The **{lora} switch** turns this into a {fast_steps}-step run at cfg 1. RFC Cache stays in the path: "
            + (FEW_STEP_RUN[:1].lower() + FEW_STEP_RUN[1:] if fast_steps >= 6 else
               UNCACHED_SHORT_RUN[:1].lower() + UNCACHED_SHORT_RUN[1:]))


TWO_STAGES = ("Both stages are cached, each by its own RFC Cache: every stage is a sampling run of its own, "
              "with its own warm-up, and the second stage computes its last step.")


def note(text: str) -> str:
    return "## RFC Cache in this workflow\n\n" + text + (
        "\n\nAfter a run the node shows which evaluations were computed (dark) and predicted (light). "
        "Open the subgraph to see it. See the pack's README for settings per model.")


def rfc(graph: Graph, model: Port, threshold: float = 0.1, max_skip: int = 3) -> Port:
    return graph.add("RFCCache", model=model, threshold=threshold, max_skip=max_skip)["MODEL"]


def speed_lora_switch(graph: Graph, model: Port, lora: str, strength: float = 1.0) -> Port:
    """The templates' turbo path: the model through a speed LoRA, or not, behind a switch (off)."""
    with_lora = graph.add("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=strength)
    return graph.add("ComfySwitchNode", title="Switch (speed LoRA)", switch=False, on_false=model,
                     on_true=with_lora["MODEL"])["output"]


def switched_number(graph: Graph, kind: str, full, fast, switch_title: str) -> Port:
    primitive = "PrimitiveInt" if kind == "INT" else "PrimitiveFloat"
    full_node = graph.add(primitive, value=full)
    fast_node = graph.add(primitive, value=fast)
    return graph.add("ComfySwitchNode", title=switch_title, switch=False, on_false=full_node[full_node.outputs[0][0]],
                     on_true=fast_node[fast_node.outputs[0][0]])["output"]


def loaders(graph: Graph, unet=None, clip=None, clip_type=None, vae=None, checkpoint=None, dual_clip=None):
    found = {}
    if checkpoint:
        loader = graph.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
        found.update(model=loader["MODEL"], clip=loader["CLIP"], vae=loader["VAE"])
    if unet:
        found["model"] = graph.add("UNETLoader", unet_name=unet, weight_dtype="default")["MODEL"]
    if clip:
        found["clip"] = graph.add("CLIPLoader", clip_name=clip, type=clip_type, device="default")["CLIP"]
    if dual_clip:
        found["clip"] = graph.add("DualCLIPLoader", clip_name1=dual_clip[0], clip_name2=dual_clip[1],
                                  type=clip_type, device="default")["CLIP"]
    if vae:
        found["vae"] = graph.add("VAELoader", vae_name=vae)["VAE"]
    return found


def text(graph: Graph, clip: Port, prompt: str, title: str) -> Port:
    return graph.add("CLIPTextEncode", title=title, clip=clip, text=prompt)["CONDITIONING"]


def image_out(workflow: Workflow, graph: Graph, decoded: Port, prefix: str) -> None:
    graph.output("IMAGE", decoded)
    instance = workflow.place(graph)
    workflow.root.add("SaveImage", images=instance["IMAGE"], filename_prefix=prefix)


def video_out(workflow: Workflow, graph: Graph, frames: Port, fps: float, prefix: str, audio: Port | None = None):
    video = graph.add("CreateVideo", images=frames, fps=fps, **({"audio": audio} if audio is not None else {}))
    graph.output("VIDEO", video["VIDEO"])
    instance = workflow.place(graph)
    workflow.root.add("SaveVideo", video=instance["VIDEO"], filename_prefix=prefix, format="auto", codec="auto")


def ksampler(graph, model, positive, negative, latent, steps, cfg, sampler="euler", scheduler="simple", **extra):
    return graph.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                     seed=42, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0,
                     **extra)["LATENT"]


# The workflows. Each returns the note's text.
def flux1_dev(w: Workflow):
    g = w.subgraph("Text to Image (FLUX.1 dev)")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="flux1-dev-fp8.safetensors")
    positive = g.add("FluxGuidance", conditioning=text(g, ckpt["CLIP"], "a lighthouse on a basalt cliff at dusk, "
                                                       "waves breaking, warm windows, 35mm photo", "Prompt"),
                     guidance=3.5)["CONDITIONING"]
    negative = g.add("ConditioningZeroOut", conditioning=positive)["CONDITIONING"]
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    sampled = ksampler(g, rfc(g, ckpt["MODEL"]), positive, negative, latent, 30, 1.0)
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=ckpt["VAE"])["IMAGE"], "RFC_flux1_dev")
    return FULL_STEPS.format(where="KSampler", steps=30, computed=11)


def flux2(w: Workflow, klein: bool):
    name = "FLUX.2 Klein 4B" if klein else "FLUX.2 dev"
    g = w.subgraph(f"Text to Image ({name})")
    found = loaders(g, unet="flux-2-klein-base-4b-fp8.safetensors" if klein else "flux2_dev_fp8mixed.safetensors",
                    clip="qwen_3_4b_fp8_mixed.safetensors" if klein else "mistral_3_small_flux2_fp8.safetensors",
                    clip_type="flux2", vae="flux2-vae.safetensors")
    steps, cfg = (20, 5.0) if klein else (30, 4.0)
    prompt = text(g, found["clip"], "a red vintage bicycle leaning on a pastel yellow wall, morning light, "
                                    "crisp shadows, street photography", "Prompt")
    model = found["model"]
    if klein:
        guider = g.add("CFGGuider", model=rfc(g, model), positive=prompt,
                       negative=text(g, found["clip"], "", "Negative"), cfg=cfg)
        fast = ""
    else:
        model = speed_lora_switch(g, model, "Flux_2-Turbo-LoRA_comfyui.safetensors")
        steps_port = switched_number(g, "INT", steps, 8, "Switch (steps)")
        guider = g.add("BasicGuider", model=rfc(g, model),
                       conditioning=g.add("FluxGuidance", conditioning=prompt, guidance=cfg)["CONDITIONING"])
        fast = " " + speed_lora("Turbo LoRA", 8)
    sigmas = g.add("Flux2Scheduler", steps=steps_port if not klein else steps, width=1024, height=1024)["SIGMAS"]
    sampled = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=42)["NOISE"],
                    guider=guider["GUIDER"], sampler=g.add("KSamplerSelect", sampler_name="euler")["SAMPLER"],
                    sigmas=sigmas,
                    latent_image=g.add("EmptyFlux2LatentImage", width=1024, height=1024, batch_size=1)["LATENT"])
    image_out(w, g, g.add("VAEDecode", samples=sampled["output"], vae=found["vae"])["IMAGE"],
              "RFC_flux2_klein" if klein else "RFC_flux2_dev")
    return FULL_STEPS.format(where="guider", steps=steps, computed=9 if klein else 11) + fast


def flux2_klein_edit(w: Workflow):
    """The Klein 9B KV image edit template's path: FluxKVCache, then RFC Cache, at 4 steps."""
    image = w.root.add("LoadImage", image="example.png")
    g = w.subgraph("Image Edit (FLUX.2 Klein 9B KV)")
    found = loaders(g, unet="flux-2-klein-9b-kv-fp8.safetensors", clip="qwen_3_8b_fp8mixed.safetensors",
                    clip_type="flux2", vae="flux2-vae.safetensors")
    reference = g.add("ImageScaleToTotalPixels", image=g.input("image", image["IMAGE"]), upscale_method="lanczos",
                      megapixels=1.0)["IMAGE"]
    encoded = g.add("VAEEncode", pixels=reference, vae=found["vae"])["LATENT"]
    positive = g.add("ReferenceLatent", conditioning=text(g, found["clip"], "turn the jacket into red leather, "
                                                          "keep the pose and background", "Prompt"),
                     latent=encoded)["CONDITIONING"]
    negative = g.add("ConditioningZeroOut", conditioning=positive)["CONDITIONING"]
    model = rfc(g, g.add("FluxKVCache", model=found["model"])["MODEL"])
    guider = g.add("CFGGuider", model=model, positive=positive, negative=negative, cfg=1.0)
    size = g.add("GetImageSize", image=reference)
    sampled = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=42)["NOISE"],
                    guider=guider["GUIDER"], sampler=g.add("KSamplerSelect", sampler_name="euler")["SAMPLER"],
                    sigmas=g.add("Flux2Scheduler", steps=4, width=size["width"], height=size["height"])["SIGMAS"],
                    latent_image=g.add("EmptyFlux2LatentImage", width=size["width"], height=size["height"],
                                       batch_size=1)["LATENT"])
    image_out(w, g, g.add("VAEDecode", samples=sampled["output"], vae=found["vae"])["IMAGE"], "RFC_flux2_klein_edit")
    return ("**RFC Cache sits right before the guider, after FluxKVCache** (either order works: RFC Cache follows "
            "the reference tokens FluxKVCache drops after the first step). This distilled model runs 4 steps at "
            "cfg 1: " + UNCACHED_SHORT_RUN + " It is here for "
            "the Klein base model at 20 to 50 steps (set the steps and cfg up, and pick the base file), where it "
            "computes about 9 of 20 on the pack's benchmark models.")


def z_image(w: Workflow, turbo: bool):
    g = w.subgraph("Text to Image (Z-Image Turbo)" if turbo else "Text to Image (Z-Image)")
    found = loaders(g, unet="z_image_turbo_bf16.safetensors" if turbo else "z_image_bf16.safetensors",
                    clip="qwen_3_4b_fp8_mixed.safetensors", clip_type="lumina2", vae="ae.safetensors")
    model = g.add("ModelSamplingAuraFlow", model=found["model"], shift=3.0)["MODEL"]
    positive = text(g, found["clip"], "a bowl of ramen on a wooden counter, steam, neon reflections, "
                                      "shallow depth of field", "Prompt")
    negative = (g.add("ConditioningZeroOut", conditioning=positive)["CONDITIONING"] if turbo
                else text(g, found["clip"], NEGATIVE, "Negative"))
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    steps, cfg = (8, 1.0) if turbo else (30, 4.0)
    sampled = ksampler(g, rfc(g, model, threshold=0.1, max_skip=1 if turbo else 4), positive, negative, latent,
                       steps, cfg, sampler="res_multistep")
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=found["vae"])["IMAGE"],
              "RFC_z_image_turbo" if turbo else "RFC_z_image")
    if turbo:
        return "**RFC Cache sits right before the KSampler.** Z-Image Turbo runs 8 steps at cfg 1. " + FEW_STEP_RUN
    return FULL_STEPS.format(where="KSampler", steps=30, computed=8).replace("max_skip 3", "max_skip 4")


def qwen_image(w: Workflow):
    g = w.subgraph("Text to Image (Qwen-Image)")
    found = loaders(g, unet="qwen_image_fp8_e4m3fn.safetensors", clip="qwen_2.5_vl_7b_fp8_scaled.safetensors",
                    clip_type="qwen_image", vae="qwen_image_vae.safetensors")
    model = speed_lora_switch(g, found["model"], "Qwen-Image-Lightning-8steps-V1.0.safetensors")
    model = g.add("ModelSamplingAuraFlow", model=model, shift=3.1)["MODEL"]
    steps = switched_number(g, "INT", 20, 8, "Switch (steps)")
    cfg = switched_number(g, "FLOAT", 2.5, 1.0, "Switch (cfg)")
    positive = text(g, found["clip"], "a hand-painted shop sign reading \"RFC Bakery\" above a blue door, "
                                      "sunlit cobblestone street", "Prompt")
    negative = text(g, found["clip"], NEGATIVE, "Negative")
    latent = g.add("EmptySD3LatentImage", width=1328, height=1328, batch_size=1)["LATENT"]
    sampled = ksampler(g, rfc(g, model), positive, negative, latent, steps, cfg)
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=found["vae"])["IMAGE"], "RFC_qwen_image")
    return (FULL_STEPS.format(where="KSampler", steps=20, computed=9) + " "
            + speed_lora("Lightning LoRA", 8))


def qwen_image_edit(w: Workflow):
    image = w.root.add("LoadImage", image="example.png")
    g = w.subgraph("Image Edit (Qwen-Image-Edit-2511)")
    found = loaders(g, unet="qwen_image_edit_2511_bf16.safetensors", clip="qwen_2.5_vl_7b_fp8_scaled.safetensors",
                    clip_type="qwen_image", vae="qwen_image_vae.safetensors")
    model = speed_lora_switch(g, found["model"], "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors")
    model = g.add("CFGNorm", model=g.add("ModelSamplingAuraFlow", model=model, shift=3.1)["MODEL"],
                  strength=1.0)["patched_model"]
    scaled = g.add("FluxKontextImageScale", image=g.input("image", image["IMAGE"]))["IMAGE"]

    def edit_text(prompt, title):
        encoded = g.add("TextEncodeQwenImageEditPlus", title=title, clip=found["clip"], vae=found["vae"],
                        image1=scaled, prompt=prompt)["CONDITIONING"]
        return g.add("FluxKontextMultiReferenceLatentMethod", conditioning=encoded,
                     reference_latents_method="index_timestep_zero")["CONDITIONING"]

    steps = switched_number(g, "INT", 40, 4, "Switch (steps)")
    cfg = switched_number(g, "FLOAT", 4.0, 1.0, "Switch (cfg)")
    latent = g.add("VAEEncode", pixels=scaled, vae=found["vae"])["LATENT"]
    sampled = ksampler(g, rfc(g, model), edit_text("turn the sofa's leather into soft grey fur", "Prompt"),
                       edit_text("", "Negative"), latent, steps, cfg)
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=found["vae"])["IMAGE"], "RFC_qwen_image_edit_2511")
    return ("**RFC Cache sits right before the KSampler, after CFGNorm.** At 40 steps the defaults computed about "
            "14 of 40 evaluations on the pack's benchmark models. " + speed_lora("Lightning LoRA", 4))


def wan22(w: Workflow, image_to_video: bool):
    kind = "i2v" if image_to_video else "t2v"
    start = w.root.add("LoadImage", image="example.png") if image_to_video else None
    g = w.subgraph(f"{'Image' if image_to_video else 'Text'} to Video (Wan 2.2, two experts)")
    clip = g.add("CLIPLoader", clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")["CLIP"]
    vae = g.add("VAELoader", vae_name="wan_2.1_vae.safetensors")["VAE"]
    lora_version = "v1" if image_to_video else "v1.1"
    experts = []
    for noise in ("high", "low"):
        model = g.add("UNETLoader", unet_name=f"wan2.2_{kind}_{noise}_noise_14B_fp8_scaled.safetensors",
                      weight_dtype="default")["MODEL"]
        model = speed_lora_switch(g, model, f"wan2.2_{kind}_lightx2v_4steps_lora_{lora_version}_{noise}"
                                               f"_noise.safetensors")
        model = g.add("ModelSamplingSD3", model=model, shift=5.0 if image_to_video else 8.0)["MODEL"]
        experts.append(rfc(g, model))
    positive = text(g, clip, "a red fox trotting through fresh snow in a birch forest at sunrise, low tracking "
                             "shot, soft golden light", "Prompt")
    negative = text(g, clip, NEGATIVE, "Negative")
    if image_to_video:
        conditioned = g.add("WanImageToVideo", positive=positive, negative=negative, vae=vae,
                            start_image=g.input("start_image", start["IMAGE"]), width=640, height=640, length=81,
                            batch_size=1)
        positive, negative, latent = conditioned["positive"], conditioned["negative"], conditioned["latent"]
    else:
        latent = g.add("EmptyHunyuanLatentVideo", width=640, height=640, length=81, batch_size=1)["LATENT"]
    steps = switched_number(g, "INT", 20, 4, "Switch (steps)")
    split = switched_number(g, "INT", 10, 2, "Switch (split step)")
    cfg = switched_number(g, "FLOAT", 3.5, 1.0, "Switch (cfg)")
    first = g.add("KSamplerAdvanced", title="High noise stage", model=experts[0], positive=positive,
                  negative=negative, latent_image=latent, add_noise="enable", noise_seed=42, steps=steps, cfg=cfg,
                  sampler_name="euler", scheduler="simple", start_at_step=0, end_at_step=split,
                  return_with_leftover_noise="enable")
    second = g.add("KSamplerAdvanced", title="Low noise stage", model=experts[1], positive=positive,
                   negative=negative, latent_image=first["LATENT"], add_noise="disable", noise_seed=42, steps=steps,
                   cfg=cfg, sampler_name="euler", scheduler="simple", start_at_step=split, end_at_step=10000,
                   return_with_leftover_noise="disable")
    frames = g.add("VAEDecode", samples=second["LATENT"], vae=vae)["IMAGE"]
    video_out(w, g, frames, 16.0, f"video/RFC_wan22_{kind}")
    return ("**RFC Cache sits right before each stage's KSamplerAdvanced**, after ModelSamplingSD3. "
            + TWO_STAGES + " At 20 steps (10 + 10) the defaults compute about 4 of 10 evaluations per stage. "
            + speed_lora("lightx2v LoRA", 4) + " That holds for the second stage, which ends the image; the "
            "first hands on a noisy latent, so its 2 steps follow the threshold.")


def wan21_vace(w: Workflow):
    g = w.subgraph("Text to Video (Wan 2.1 VACE 14B)")
    found = loaders(g, unet="wan2.1_vace_14B_fp16.safetensors", clip="umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                    clip_type="wan", vae="wan_2.1_vae.safetensors")
    model = speed_lora_switch(g, found["model"], "Wan21_CausVid_14B_T2V_lora_rank32.safetensors", 0.7)
    model = g.add("ModelSamplingSD3", model=model, shift=8.0)["MODEL"]
    positive = text(g, found["clip"], "a paper boat drifting down a rain-soaked city gutter, macro lens, "
                                      "reflections of shop lights", "Prompt")
    negative = text(g, found["clip"], NEGATIVE, "Negative")
    vace = g.add("WanVaceToVideo", positive=positive, negative=negative, vae=found["vae"], width=832, height=480,
                 length=81, batch_size=1, strength=1.0)
    steps = switched_number(g, "INT", 30, 4, "Switch (steps)")
    cfg = switched_number(g, "FLOAT", 6.0, 1.0, "Switch (cfg)")
    sampled = ksampler(g, rfc(g, model), vace["positive"], vace["negative"], vace["latent"], steps, cfg,
                       sampler="uni_pc")
    trimmed = g.add("TrimVideoLatent", samples=sampled, trim_amount=vace["trim_latent"])["LATENT"]
    video_out(w, g, g.add("VAEDecode", samples=trimmed, vae=found["vae"])["IMAGE"], 16.0, "video/RFC_wan21_vace")
    return (FULL_STEPS.format(where="KSampler", steps=30, computed=11) + " "
            + speed_lora("CausVid LoRA", 4))


def hunyuan_video(w: Workflow):
    g = w.subgraph("Text to Video (HunyuanVideo)")
    found = loaders(g, unet="hunyuan_video_t2v_720p_bf16.safetensors",
                    dual_clip=("clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors"),
                    clip_type="hunyuan_video", vae="hunyuan_video_vae_bf16.safetensors")
    model = rfc(g, g.add("ModelSamplingSD3", model=found["model"], shift=7.0)["MODEL"])
    conditioning = g.add("FluxGuidance", conditioning=text(g, found["clip"], "a koi pond in the rain, ripples, "
                                                          "slow pan", "Prompt"), guidance=6.0)["CONDITIONING"]
    sampled = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=42)["NOISE"],
                    guider=g.add("BasicGuider", model=model, conditioning=conditioning)["GUIDER"],
                    sampler=g.add("KSamplerSelect", sampler_name="euler")["SAMPLER"],
                    sigmas=g.add("BasicScheduler", model=model, scheduler="simple", steps=20, denoise=1.0)["SIGMAS"],
                    latent_image=g.add("EmptyHunyuanLatentVideo", width=848, height=480, length=73,
                                       batch_size=1)["LATENT"])
    frames = g.add("VAEDecodeTiled", samples=sampled["output"], vae=found["vae"], tile_size=256, overlap=64,
                   temporal_size=64, temporal_overlap=8)["IMAGE"]
    video_out(w, g, frames, 24.0, "video/RFC_hunyuan_video")
    return FULL_STEPS.format(where="guider (after ModelSamplingSD3)", steps=20, computed=9)


def hunyuan_video_15(w: Workflow):
    g = w.subgraph("Text to Video (HunyuanVideo 1.5)")
    found = loaders(g, unet="hunyuanvideo1.5_720p_t2v_fp16.safetensors",
                    dual_clip=("qwen_2.5_vl_7b_fp8_scaled.safetensors", "byt5_small_glyphxl_fp16.safetensors"),
                    clip_type="hunyuan_video_15", vae="hunyuanvideo15_vae_fp16.safetensors")
    model = rfc(g, g.add("ModelSamplingSD3", model=found["model"], shift=7.0)["MODEL"])
    positive = text(g, found["clip"], "a hot air balloon rising over terraced rice fields at dawn, aerial shot",
                    "Prompt")
    negative = text(g, found["clip"], NEGATIVE, "Negative")
    latent = g.add("EmptyHunyuanVideo15Latent", width=1280, height=720, length=121, batch_size=1)["LATENT"]
    sampled = ksampler(g, model, positive, negative, latent, 30, 6.0)
    video_out(w, g, g.add("VAEDecode", samples=sampled, vae=found["vae"])["IMAGE"], 24.0,
              "video/RFC_hunyuan_video_15")
    return FULL_STEPS.format(where="KSampler (after ModelSamplingSD3)", steps=30, computed=11)


def ltx2(w: Workflow, image_to_video: bool):
    checkpoint = "ltx-2.3-22b-dev-fp8.safetensors" if image_to_video else "ltx-2-19b-dev-fp8.safetensors"
    start = w.root.add("LoadImage", image="example.png") if image_to_video else None
    g = w.subgraph("Image to Video (LTX-2.3)" if image_to_video else "Text to Video with Audio (LTX-2)")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    clip = g.add("LTXAVTextEncoderLoader", text_encoder="gemma_3_12B_it_fp4_mixed.safetensors",
                 ckpt_name=checkpoint, device="default")["CLIP"]
    audio_vae = g.add("LTXVAudioVAELoader", ckpt_name=checkpoint)["Audio VAE"]
    model = ckpt["MODEL"]
    if image_to_video:
        model = speed_lora_switch(g, model, "ltx-2.3-22b-distilled-lora-384.safetensors", 0.6)
    model = rfc(g, model)
    conditioned = g.add("LTXVConditioning", positive=text(g, clip, "a lighthouse keeper climbs the spiral stairs, "
                                                                  "wind howling outside, lantern light", "Prompt"),
                        negative=text(g, clip, NEGATIVE, "Negative"), frame_rate=25.0)
    video_latent = g.add("EmptyLTXVLatentVideo", width=768, height=512, length=97, batch_size=1)["LATENT"]
    if image_to_video:
        video_latent = g.add("LTXVImgToVideoInplace", vae=ckpt["VAE"],
                             image=g.add("LTXVPreprocess", image=g.input("start_image", start["IMAGE"]),
                                         img_compression=18)["output_image"],
                             latent=video_latent, strength=1.0, bypass=False)["latent"]
    audio_latent = g.add("LTXVEmptyLatentAudio", audio_vae=audio_vae, frames_number=97, frame_rate=25,
                         batch_size=1)["Latent"]
    latent = g.add("LTXVConcatAVLatent", video_latent=video_latent, audio_latent=audio_latent)["latent"]
    guider = g.add("CFGGuider", model=model, positive=conditioned["positive"], negative=conditioned["negative"],
                   cfg=4.0)
    steps = switched_number(g, "INT", 30, 8, "Switch (steps)") if image_to_video else 30
    sigmas = g.add("LTXVScheduler", latent=latent, steps=steps, max_shift=2.05, base_shift=0.95, stretch=True,
                   terminal=0.1)["SIGMAS"]
    sampled = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=42)["NOISE"],
                    guider=guider["GUIDER"], sampler=g.add("KSamplerSelect", sampler_name="euler")["SAMPLER"],
                    sigmas=sigmas, latent_image=latent)
    separated = g.add("LTXVSeparateAVLatent", av_latent=sampled["output"])
    frames = g.add("VAEDecode", samples=separated["video_latent"], vae=ckpt["VAE"])["IMAGE"]
    audio = g.add("LTXVAudioVAEDecode", samples=separated["audio_latent"], audio_vae=audio_vae)["Audio"]
    video_out(w, g, frames, 25.0, "video/RFC_ltx23_i2v" if image_to_video else "video/RFC_ltx2", audio=audio)
    text_ = FULL_STEPS.format(where="guider", steps=30, computed=11) + (
        " Video and audio are predicted apart, decided together.")
    if image_to_video:
        text_ += " " + speed_lora("distilled LoRA", 8)
    return text_


def krea2(w: Workflow):
    g = w.subgraph("Text to Image (Krea 2 Turbo)")
    found = loaders(g, unet="krea2_turbo_fp8_scaled.safetensors", clip="qwen3vl_4b_fp8_scaled.safetensors",
                    clip_type="krea2", vae="qwen_image_vae.safetensors")
    positive = text(g, found["clip"], "an ink-and-watercolour map of an imaginary harbour town, hand lettering",
                    "Prompt")
    negative = g.add("ConditioningZeroOut", conditioning=positive)["CONDITIONING"]
    latent = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    sampled = ksampler(g, rfc(g, found["model"], threshold=0.1, max_skip=1), positive, negative, latent, 8, 1.0)
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=found["vae"])["IMAGE"], "RFC_krea2_turbo")
    return "**RFC Cache sits right before the KSampler.** Krea 2 Turbo runs 8 steps at cfg 1. " + FEW_STEP_RUN


def minimax_h3(w: Workflow):
    g = w.subgraph("Text to Video (MiniMax H3)")
    found = loaders(g, unet="minimax_h3_fl2va_pruned_int8_convrot.safetensors",
                    clip="qwen3vl_32b_minimax_h3_nvfp4_awq.safetensors", clip_type="minimax",
                    vae="minimax_h3_video_vae_int8_convrot.safetensors")
    model = speed_lora_switch(g, found["model"], "minimax_h3_fl2v_turbo_8step_v1.0_comfyui_bf16.safetensors")
    conditioned = g.add("MiniMaxH3ImageToVideo", clip=found["clip"], vae=found["vae"],
                        prompt="a glass of iced tea on a sunny balcony, condensation running down, slow push in",
                        width=1344, height=768, length=124)
    steps = switched_number(g, "INT", 30, 8, "Switch (steps)")
    guider = g.add("BasicGuider", model=rfc(g, model), conditioning=conditioned["positive"])
    sampled = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=42)["NOISE"],
                    guider=guider["GUIDER"], sampler=g.add("KSamplerSelect", sampler_name="res_multistep")["SAMPLER"],
                    sigmas=g.add("BasicScheduler", model=model, scheduler="simple", steps=steps,
                                 denoise=1.0)["SIGMAS"],
                    latent_image=conditioned["LATENT"])
    video_out(w, g, g.add("VAEDecode", samples=sampled["output"], vae=found["vae"])["IMAGE"], 24.0,
              "video/RFC_minimax_h3")
    return ("**RFC Cache sits right before the guider.** MiniMax H3 is cached block by block: each block's video, "
            "audio and text rows as modules of their own, the first block's video deciding each step. Not measured "
            "on trained weights (the pack's tests run a tiny random-weight model), so read the count the node shows "
            "after a run. " + speed_lora("Turbo LoRA", 8))


def lumina2(w: Workflow):
    g = w.subgraph("Text to Image (Lumina Image 2.0)")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="lumina_2.safetensors")
    model = rfc(g, g.add("ModelSamplingAuraFlow", model=ckpt["MODEL"], shift=6.0)["MODEL"], max_skip=4)
    positive = text(g, ckpt["CLIP"], "You are an assistant designed to generate superior images with the superior "
                                     "degree of image-text alignment based on textual prompts or user prompts. "
                                     "<Prompt Start> a snow leopard on a rocky ridge, golden hour", "Prompt")
    negative = text(g, ckpt["CLIP"], NEGATIVE, "Negative")
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    sampled = ksampler(g, model, positive, negative, latent, 25, 4.0, sampler="res_multistep")
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=ckpt["VAE"])["IMAGE"], "RFC_lumina2")
    return FULL_STEPS.format(where="KSampler", steps=25, computed=7).replace("max_skip 3", "max_skip 4")


def sd35(w: Workflow):
    g = w.subgraph("Text to Image (SD3.5 Large)")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="sd3.5_large_fp8_scaled.safetensors")
    positive = text(g, ckpt["CLIP"], "a cozy reading nook with a rain-streaked window, warm lamp light", "Prompt")
    negative = text(g, ckpt["CLIP"], NEGATIVE, "Negative")
    latent = g.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    sampled = ksampler(g, rfc(g, ckpt["MODEL"]), positive, negative, latent, 20, 4.0, scheduler="sgm_uniform")
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=ckpt["VAE"])["IMAGE"], "RFC_sd35_large")
    return FULL_STEPS.format(where="KSampler", steps=20, computed=9)


def sdxl(w: Workflow):
    g = w.subgraph("Text to Image (SDXL, whole model)")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")
    positive = text(g, ckpt["CLIP"], "a watercolour of a harbour at dawn, fishing boats", "Prompt")
    negative = text(g, ckpt["CLIP"], NEGATIVE, "Negative")
    latent = g.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)["LATENT"]
    sampled = ksampler(g, rfc(g, ckpt["MODEL"], threshold=0.03), positive, negative, latent, 25, 7.0,
                       scheduler="normal")
    image_out(w, g, g.add("VAEDecode", samples=sampled, vae=ckpt["VAE"])["IMAGE"], "RFC_sdxl_whole_model")
    return ("**RFC Cache sits right before the KSampler.** SDXL is a UNet: it is cached as whole model calls, "
            "with a lower threshold (0.03).")


WORKFLOW_BUILDERS = {
    "flux_text_to_image_rfc.json": flux1_dev,
    "flux2_dev_text_to_image_rfc.json": lambda w: flux2(w, klein=False),
    "flux2_klein_text_to_image_rfc.json": lambda w: flux2(w, klein=True),
    "flux2_klein_image_edit_kv_cache_rfc.json": flux2_klein_edit,
    "z_image_text_to_image_rfc.json": lambda w: z_image(w, turbo=False),
    "z_image_turbo_text_to_image_rfc.json": lambda w: z_image(w, turbo=True),
    "qwen_image_text_to_image_rfc.json": qwen_image,
    "qwen_image_edit_2511_rfc.json": qwen_image_edit,
    "wan22_text_to_video_two_experts_rfc.json": lambda w: wan22(w, image_to_video=False),
    "wan22_image_to_video_two_experts_rfc.json": lambda w: wan22(w, image_to_video=True),
    "wan21_vace_text_to_video_rfc.json": wan21_vace,
    "hunyuan_video_text_to_video_rfc.json": hunyuan_video,
    "hunyuan_video_15_text_to_video_rfc.json": hunyuan_video_15,
    "ltx2_text_to_video_with_audio_rfc.json": lambda w: ltx2(w, image_to_video=False),
    "ltx23_image_to_video_rfc.json": lambda w: ltx2(w, image_to_video=True),
    "krea2_turbo_text_to_image_rfc.json": krea2,
    "minimax_h3_text_to_video_rfc.json": minimax_h3,
    "lumina2_text_to_image_rfc.json": lumina2,
    "sd35_text_to_image_rfc.json": sd35,
    "sdxl_text_to_image_rfc_whole_model.json": sdxl,
}


def build(file_name: str, definitions: dict) -> dict:
    workflow = Workflow(file_name, definitions)
    text_ = WORKFLOW_BUILDERS[file_name](workflow)
    workflow.root.add("MarkdownNote", title="RFC Cache", text=note(text_))
    return workflow.json()


def main() -> None:
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (v0.31 or newer) whose requirements this Python has")
    sys.path.insert(0, str(ROOT))
    from benchmarks.host import boot_comfyui

    definitions = node_definitions(boot_comfyui(comfyui))
    for stale in WORKFLOWS.glob("*.json"):
        if stale.name not in WORKFLOW_BUILDERS:
            stale.unlink()
    for file_name in WORKFLOW_BUILDERS:
        (WORKFLOWS / file_name).write_text(json.dumps(build(file_name, definitions), indent=1,
                                                      ensure_ascii=False) + "\n")
        print(f"wrote workflows/{file_name}")


if __name__ == "__main__":
    main()
