"""tools/template_coverage.py: the share of the official templates' use the
pack runs at block level. Its table is checked against the pack's adapters,
its arithmetic on a small index written here; the real index is read where
the templates package is installed (it is not in CI)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from benchmarks.methods import PACK_NAME, load_pack

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("template_coverage", ROOT / "tools" / "template_coverage.py")
coverage = importlib.util.module_from_spec(_spec)
sys.modules["template_coverage"] = coverage
_spec.loader.exec_module(coverage)

load_pack()
adapters = sys.modules[f"{PACK_NAME}.nodes.adapters"]


def test_every_block_level_family_names_an_adapter_the_pack_has():
    families = set(adapters.supported_families())
    for entry in coverage.MODEL_FILES:
        if entry.granularity == coverage.BLOCKS:
            assert entry.adapter in families, entry
        else:
            assert entry.adapter is None, entry


def test_a_template_counts_at_its_coarsest_model_and_preprocessors_only_alone():
    classify = coverage.classify
    assert classify("t", 5, ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                             "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"]).granularity == coverage.BLOCKS
    assert classify("t", 5, ["sd_xl_base_1.0.safetensors", "svd_xt.safetensors"]).granularity == coverage.MODEL
    mixed = classify("t", 5, ["pixal3d_int8_convrot.safetensors", "trellis_2_int8_convrot.safetensors"])
    assert mixed.granularity == coverage.NONE
    # A depth preprocessor ahead of FLUX.1 does not count; alone, it does.
    assert classify("t", 5, ["flux1-dev-fp8.safetensors", "lotus-depth-d-v1-1.safetensors"]).family == "FLUX.1"
    assert classify("t", 5, ["lotus-depth-d-v1-1.safetensors"]).granularity == coverage.MODEL
    # No diffusion model at all: not a diffusion template.
    assert classify("t", 5, ["sam3.1_multiplex_fp16.safetensors"]) is None
    assert classify("t", 5, []) is None
    with pytest.raises(KeyError, match="no entry"):
        classify("t", 5, ["some_new_model.safetensors"])


def test_the_2026_families_this_issue_moved():
    assert coverage.model_file("minimax_h3_fl2va_pruned_int8_convrot.safetensors").granularity == coverage.BLOCKS
    assert coverage.model_file("fastvideo_fasth3_8step_v2_pruned_int8_convrot.safetensors").family == "MiniMax H3"
    ltx25 = coverage.model_file("ltx-2.5-22b-distilled-transformer-comfy-int8-convrot.safetensors")
    assert (ltx25.family, ltx25.adapter) == ("LTX-2.5", "ltx2")
    assert coverage.model_file("ltx-2.3-22b-dev-fp8.safetensors").family == "LTX-2 / 2.3"


def _workflow(*files, loader_file=None) -> dict:
    nodes = [{"type": "UNETLoader", "properties": {"models": [{"name": name, "directory": "diffusion_models"}]},
              "widgets_values": [name, "default"]} for name in files]
    if loader_file:
        # Named only by a checkpoint loader's widget, inside a subgraph.
        return {"nodes": [], "definitions": {"subgraphs": [
            {"nodes": [*nodes, {"type": "CheckpointLoaderSimple", "widgets_values": [loader_file]}]}]}}
    return {"nodes": nodes}


def test_shares_are_weighted_by_use_over_local_diffusion_templates(tmp_path):
    templates = {
        "a": (600, _workflow("minimax_h3_fl2va_pruned_int8_convrot.safetensors")),
        "b": (300, _workflow(loader_file="sd_xl_base_1.0.safetensors")),
        "c": (100, _workflow("flux3-image-klein-int8-convrot.safetensors")),
        "llm": (5000, _workflow()),
    }
    index = [{"templates": [{"name": name, "usage": usage} for name, (usage, _) in templates.items()]
              + [{"name": "api_only", "usage": 9000, "openSource": False}]}]
    (tmp_path / "index.json").write_text(json.dumps(index))
    for name, (_, workflow) in templates.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(workflow))
    found, local = coverage.load(tmp_path)
    assert local == 4 and sorted(t.name for t in found) == ["a", "b", "c"]
    assert coverage.shares(found) == pytest.approx({coverage.BLOCKS: 0.6, coverage.MODEL: 0.3, coverage.NONE: 0.1})
    assert "60.0% of the diffusion templates' use runs at block level" in coverage.coverage_line(found, "x")


@pytest.mark.skipif(importlib.util.find_spec(coverage.PACKAGE) is None,
                    reason="comfyui-workflow-templates-json is not installed in this Python")
def test_the_official_templates_run_at_block_level_for_at_least_88_percent_of_their_use():
    found, _ = coverage.load(coverage.templates_folder(None))  # raises on a model file the table does not know
    assert coverage.shares(found)[coverage.BLOCKS] >= 0.88
