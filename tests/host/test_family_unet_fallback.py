"""Whole-model caching: what every model without a block adapter gets (here
SD1.5 and SDXL UNets), and what any model gets with granularity "model"."""

from __future__ import annotations

import dataclasses

import torch

from family_harness import FORCED, FamilyContract, FamilySpec, rfc, sample_spec
from shared_specs import FLUX_SPEC
from tiny_models import FLUX_CONFIG, build, counted

UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "use_spatial_transformer": True, "legacy": False, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "context_dim": 32, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SIZE_EMBEDDINGS = 6 * 256  # SDXL's adm: pooled text plus six 256-wide size/crop embeddings


def unet_conditioning(pooled):
    def make(batch, seed):
        generator = torch.Generator().manual_seed(seed)
        extras = {"pooled_output": torch.randn(batch, pooled, generator=generator)} if pooled else {}
        return [[torch.randn(batch, 8, 32, generator=generator), extras]]
    return make


def whole_model(diffusion_model):
    return [diffusion_model]


SD15 = FamilySpec(
    name="UNetModel", config_class="SD15",
    unet_config={**UNET_COMMON, "adm_in_channels": None, "transformer_depth": [1, 1],
                 "transformer_depth_output": [1, 1, 1, 1], "use_linear_in_transformer": False},
    latent_shape=(4, 16, 16), conditioning=unet_conditioning(0), counted_modules=whole_model, granularity="model")

SDXL = FamilySpec(
    name="UNetModel", config_class="SDXL",
    unet_config={**UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 32 + SIZE_EMBEDDINGS,
                 "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
                 "use_linear_in_transformer": True, "num_head_channels": 16},
    latent_shape=(4, 16, 16), conditioning=unet_conditioning(32), counted_modules=whole_model, granularity="model")


class TestSD15(FamilyContract):
    spec = SD15


class TestSDXL(FamilyContract):
    spec = SDXL


FLUX_AS_WHOLE_MODEL = dataclasses.replace(FLUX_SPEC, counted_modules=whole_model, granularity="model")


def test_granularity_model_caches_a_block_family_as_one_module(comfy):
    """The Advanced node's granularity "model" on Flux: whole model calls are
    skipped on the same schedule as blocks would be, every block with them."""
    import nodes

    model = build("Flux", FLUX_CONFIG)
    diffusion_model = model.model.diffusion_model
    blocks = list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)
    patched = rfc(nodes, model, granularity="model", estimator="rfe", scheduler="rcs", interval=3, **FORCED)
    reference, reference_calls = counted(blocks, lambda: sample_spec(FLUX_AS_WHOLE_MODEL, model, steps=30, cfg=3.0,
                                                                      batch=2))
    latent, calls = counted(blocks, lambda: sample_spec(FLUX_AS_WHOLE_MODEL, patched, steps=30, cfg=3.0, batch=2))
    assert calls == reference_calls // 30 * 10
    assert torch.isfinite(latent).all()
    assert ((latent - reference).norm() / reference.norm()).item() < 1.0
