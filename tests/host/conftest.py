"""Host tier: runs inside a real ComfyUI checkout named by COMFYUI_PATH.

Without it every test here is skipped with that reason. The pack is loaded
the way ComfyUI loads custom nodes (from a custom_nodes folder, through
`nodes.init_extra_nodes`), and models are tiny random-weight instances of
ComfyUI's own model classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="host test: set COMFYUI_PATH to a ComfyUI checkout to run it")
    for item in items:
        if "tests/host" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported on the CPU with this pack loaded from custom_nodes."""
    import torch

    from benchmarks.host import boot_comfyui

    # The tiny models run many times faster on one thread than on several
    # competing for a shared machine's cores (LTX-2's 12 steps: 0.2 s
    # against 8 to 14 s on two loaded cores).
    torch.set_num_threads(1)
    boot_comfyui(COMFYUI_PATH)
    # A v0.31.0 tree with ../shared/comfy_overlay laid over it (the families
    # of later ComfyUI): its model configs and nodes register on import.
    if importlib.util.find_spec("comfy.overlay_models") is not None:
        importlib.import_module("comfy.overlay_models")
        importlib.import_module("comfy_extras.nodes_overlay_newer")
    return sys.modules["comfy"]


@pytest.fixture(scope="session")
def nodes(comfy):
    """ComfyUI's `nodes` module, with this pack's nodes registered."""
    import nodes

    return nodes
