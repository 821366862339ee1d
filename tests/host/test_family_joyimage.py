"""JoyImage: double blocks whose modulation adds a learned table to the
(batch, 6, dim) timestep projection; 5-D latent with one frame."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec

SPEC = FamilySpec(
    name="joyimage", config_class="JoyImage",
    unet_config={"image_model": "joyimage", "in_channels": 16, "hidden_size": 64, "patch_size": [1, 2, 2],
                 "num_layers": 2, "num_attention_heads": 2, "text_dim": 32},
    # JoyImage's config forces full-size rope axes over the ones given.
    overrides={"rope_dim_list": [8, 12, 12], "theta": 10000},
    latent_shape=(16, 1, 8, 8),
    conditioning=lambda batch, seed: [[torch.randn(batch, 6, 32, generator=torch.Generator().manual_seed(seed)), {}]],
    probe=lambda block, kind: block.attn.img_attn_qkv,
)


class TestJoyImage(FamilyContract):
    spec = SPEC
