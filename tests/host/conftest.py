"""Host tier: runs inside a real ComfyUI checkout named by COMFYUI_PATH.

Without it every test here is skipped with that reason. The pack is loaded
the way ComfyUI loads custom nodes (from a custom_nodes folder, through
`nodes.init_extra_nodes`), and models are tiny random-weight instances of
ComfyUI's own model classes.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-RFC"
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
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths
    import nodes

    custom_nodes = Path(tempfile.mkdtemp(prefix="rfc-custom-nodes-"))
    (custom_nodes / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    assert "RFCCache" in nodes.NODE_CLASS_MAPPINGS, "the pack did not load; see the log above"
    return sys.modules["comfy"]
