"""Mage-Flow: Qwen-Image's blocks behind a patch point of its own; 128-channel latent."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec

SPEC = FamilySpec(
    name="mage_flow", config_class="MageFlow",
    unet_config={"image_model": "mage_flow", "in_channels": 128, "out_channels": 128, "num_layers": 2,
                 "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                 "axes_dims_rope": [8, 12, 12]},
    latent_shape=(128, 4, 4),
    conditioning=lambda batch, seed: [[torch.randn(batch, 6, 32, generator=torch.Generator().manual_seed(seed)), {}]],
    probe=lambda block, kind: block.attn.to_q,
)


class TestMageFlow(FamilyContract):
    spec = SPEC
