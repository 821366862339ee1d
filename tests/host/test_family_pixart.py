"""PixArt Sigma and Alpha: object-patched blocks in a model that drops
transformer_options before them."""

from __future__ import annotations

from dataclasses import replace

import torch

from family_harness import FamilyContract, FamilySpec
from family_harness import ObjectPatchIsUndone

PIXART_SIGMA_CONFIG = {
    "image_model": "pixart_sigma", "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
    "num_heads": 2, "caption_channels": 32, "model_max_length": 8, "micro_condition": False, "pred_sigma": True,
}
# Alpha also adds the embedded image size (two thirds of the width) and
# aspect ratio (one third) to the timestep embedding.
PIXART_ALPHA_CONFIG = {**PIXART_SIGMA_CONFIG, "image_model": "pixart_alpha", "micro_condition": True,
                       "hidden_size": 96}


def t5_conditioning(batch: int, seed: int) -> list:
    return [[torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed)), {}]]


# PixArt scales its position embedding by round(mean latent side / 64), which
# is 0 (a division by zero) for a mean side of 32 or less: a wide latent keeps
# it at 1 with few tokens.
LATENT_SHAPE = (4, 16, 80)


def evaluation_mode(diffusion_model):
    # In training mode PixArt's caption embedder drops tokens on CUDA.
    diffusion_model.eval()


SIGMA = FamilySpec(
    name="pixart",
    config_class="PixArtSigma",
    unet_config=PIXART_SIGMA_CONFIG,
    latent_shape=LATENT_SHAPE,
    conditioning=t5_conditioning,
    counted_modules=lambda dm: [block.attn for block in dm.blocks],
    probe=lambda block, kind: block.attn.qkv,
    prepare=evaluation_mode,
)
ALPHA = replace(SIGMA, config_class="PixArtAlpha", unet_config=PIXART_ALPHA_CONFIG)


class TestPixArtSigma(FamilyContract, ObjectPatchIsUndone):
    spec = SIGMA


class TestPixArtAlpha(FamilyContract):
    spec = ALPHA
