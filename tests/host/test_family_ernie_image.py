"""ERNIE-Image: object-patched layers that get no transformer options, over
the [image, text] sequence."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec, ObjectPatchIsUndone

ERNIE_IMAGE_CONFIG = {
    "image_model": "ernie", "hidden_size": 64, "num_attention_heads": 2, "num_layers": 2, "ffn_hidden_size": 128,
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "text_in_dim": 32, "rope_axes_dim": (8, 12, 12),
}


def ernie_image_conditioning(batch: int, seed: int, tokens: int = 6) -> list:
    return [[torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(seed)), {}]]


SPEC = FamilySpec(
    name="ernie_image",
    config_class="ErnieImage",
    unet_config=ERNIE_IMAGE_CONFIG,
    latent_shape=(128, 4, 4),
    conditioning=ernie_image_conditioning,
    counted_modules=lambda dm: [layer.self_attention for layer in dm.layers],
    probe=lambda block, kind: block.self_attention.to_q,
)


class TestErnieImage(FamilyContract, ObjectPatchIsUndone):
    spec = SPEC
