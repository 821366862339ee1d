"""Core's CFGNorm next to RFC Cache, as the Qwen-Image-Edit templates chain
it (loader -> ModelSampling -> CFGNorm -> RFC Cache -> sampler): it rescales
the guided result after CFG and never touches the blocks, so either order
gives the same run."""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, rfc, sample_spec
from shared_specs import FLUX_SPEC
from tiny_models import build, counted


def cfg_norm(patcher, strength=1.0):
    import comfy_extras.nodes_cfg as nodes_cfg

    output = nodes_cfg.CFGNorm.execute(patcher, strength)
    return output.result[0] if hasattr(output, "result") else output[0]


@pytest.fixture(scope="module")
def flux(comfy):
    return build(FLUX_SPEC.config_class, FLUX_SPEC.unet_config)


def blocks(model):
    diffusion_model = model.model.diffusion_model
    return [*diffusion_model.double_blocks, *diffusion_model.single_blocks]


def test_cfgnorm_in_either_order_with_rfc(flux, nodes):
    steps = 12
    reference, reference_calls = counted(blocks(flux), lambda: sample_spec(FLUX_SPEC, cfg_norm(flux), steps=steps,
                                                                           cfg=3.0))
    exact = sample_spec(FLUX_SPEC, rfc(nodes, cfg_norm(flux), **{**FORCED, "threshold": 0.0}), steps=steps, cfg=3.0)
    assert torch.equal(exact, reference)
    before, before_calls = counted(blocks(flux), lambda: sample_spec(
        FLUX_SPEC, rfc(nodes, cfg_norm(flux), **FORCED), steps=steps, cfg=3.0))
    after, after_calls = counted(blocks(flux), lambda: sample_spec(
        FLUX_SPEC, cfg_norm(rfc(nodes, flux, **FORCED)), steps=steps, cfg=3.0))
    assert torch.equal(before, after)
    assert before_calls == after_calls < reference_calls
    assert torch.isfinite(before).all()
