"""FLUX.2 dev, Klein and Klein edit: ComfyUI's `Flux` class with global
modulation. The blocks own no modulation; the model computes it once and
passes it in `vec`. Klein edit appends reference-image tokens to the image
stream and, with `index_timestep_zero`, modulates them with the embedding at
t = 0, a second modulation row. The module input leaves those tokens out."""

from __future__ import annotations

import dataclasses

import torch

from family_harness import FamilyContract, FamilySpec
from test_family_hunyuan_video import flux_block_probe

FLUX2_KLEIN = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": False,
    "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0,
}
FLUX2_DEV = dict(FLUX2_KLEIN, guidance_embed=True)
LATENT_SHAPE = (128, 8, 8)


def text(batch: int, seed: int, **extras) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 6, 32, generator=generator), extras]]


def edit(batch: int, seed: int) -> list:
    """One reference image at timestep zero, as Klein edit conditions it."""
    reference = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(11))
    return text(batch, seed, reference_latents=[reference], reference_latents_method="index_timestep_zero")


KLEIN = FamilySpec(name="flux", config_class="Flux2", unet_config=FLUX2_KLEIN, latent_shape=LATENT_SHAPE,
                   conditioning=text, probe=flux_block_probe)
DEV = dataclasses.replace(KLEIN, unet_config=FLUX2_DEV,
                          conditioning=lambda batch, seed: text(batch, seed, guidance=4.0))
# One reference latent of LATENT_SHAPE at patch size 1: 8 x 8 tokens.
KLEIN_EDIT = dataclasses.replace(KLEIN, conditioning=edit, reference_tokens=LATENT_SHAPE[1] * LATENT_SHAPE[2])


class TestFlux2Klein(FamilyContract):
    spec = KLEIN


class TestFlux2Dev(FamilyContract):
    spec = DEV


class TestFlux2KleinEdit(FamilyContract):
    spec = KLEIN_EDIT
