"""Qwen-Image: one stream pair (img, txt) per block; the block returns
(txt, img) and the patch a dict. Its latent is 5-D with one frame."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec

QWEN_IMAGE_CONFIG = {
    "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12),
}


def qwen_image_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 6, 32, generator=generator), {}]]


SPEC = FamilySpec(
    name="qwen_image",
    config_class="QwenImage",
    unet_config=QWEN_IMAGE_CONFIG,
    latent_shape=(16, 1, 16, 16),
    conditioning=qwen_image_conditioning,
    probe=lambda block, kind: block.attn.to_q,
)


class TestQwenImage(FamilyContract):
    spec = SPEC
