"""The graphs of a workflow file as the front-end saves it: the root graph
and every subgraph definition (the official templates put the sampler in
one), with their links in one form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# Nodes the front-end draws that the server never runs.
FRONT_END_ONLY = ("MarkdownNote", "Note")
# The ends of a subgraph's links that are its own inputs and outputs.
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20


@dataclass
class Graph:
    name: str
    nodes: dict  # id -> node
    links: list  # (id, origin, origin slot, target, target slot, type)
    inputs: list  # a subgraph's inputs: {"name", "type", ...}; [] for the root graph
    outputs: list


def graphs(path: Path) -> tuple[list[Graph], dict]:
    """Every graph of the workflow, the root first, and the subgraph
    definitions by id."""
    workflow = json.loads(path.read_text())
    found = [Graph("root", {node["id"]: node for node in workflow["nodes"]},
                   [tuple(link) for link in workflow["links"]], [], [])]
    definitions = {}
    for definition in workflow.get("definitions", {}).get("subgraphs", []):
        definitions[definition["id"]] = definition
        found.append(Graph(definition["name"], {node["id"]: node for node in definition["nodes"]},
                           [(link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                             link["target_slot"], link["type"]) for link in definition["links"]],
                           definition["inputs"], definition["outputs"]))
    return found, definitions
