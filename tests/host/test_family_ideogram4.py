"""Ideogram 4: object-patched layers over the packed [text, image] sequence,
with a padded caption so the block-diagonal attention mask is used."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec, ObjectPatchIsUndone

IDEOGRAM4_CONFIG = {"image_model": "ideogram4", "in_channels": 128, "num_layers": 2}

# The config class forces full-size dimensions over the unet config; these
# are set after it is made.
TINY_DIMENSIONS = {
    "num_attention_heads": 2, "attention_head_dim": 32, "intermediate_size": 128, "adaln_dim": 32,
    "llm_features_dim": 48, "rope_theta": 10000, "mrope_section": [6, 5, 5], "norm_eps": 1e-5,
}


def ideogram4_conditioning(batch: int, seed: int) -> list:
    """Seven caption tokens, the last two padding. ComfyUI drops an all-ones
    mask, so this one keeps the model's masked path in use."""
    cross = torch.randn(batch, 7, 48, generator=torch.Generator().manual_seed(seed))
    return [[cross, {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}]]


SPEC = FamilySpec(
    name="ideogram4",
    config_class="Ideogram4",
    unet_config=IDEOGRAM4_CONFIG,
    overrides=TINY_DIMENSIONS,
    latent_shape=(128, 4, 4),
    conditioning=ideogram4_conditioning,
    counted_modules=lambda dm: [layer.attention for layer in dm.layers],
    probe=lambda block, kind: block.attention.qkv,
)


class TestIdeogram4(FamilyContract, ObjectPatchIsUndone):
    spec = SPEC
