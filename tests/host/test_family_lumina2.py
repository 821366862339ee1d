"""Lumina Image 2.0 (NextDiT, also Z-Image's class): object-patched noise
refiners and main layers; the context refiners run every evaluation."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec, ObjectPatchIsUndone

LUMINA2_CONFIG = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True, "axes_dims": [8, 12, 12],
    "axes_lens": [300, 512, 512],
}


def text_conditioning(batch: int, seed: int, tokens: int = 8, width: int = 32) -> list:
    """Caption features plus the all-ones attention mask Lumina 2 and OmniGen2
    read `num_tokens` from. ComfyUI counts the mask of one prompt, so it has
    batch 1 whatever the latent batch."""
    cross = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))
    return [[cross, {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}]]


SPEC = FamilySpec(
    name="lumina2",
    config_class="Lumina2",
    unet_config=LUMINA2_CONFIG,
    latent_shape=(16, 16, 16),
    conditioning=text_conditioning,
    counted_modules=lambda dm: [block.attention for block in (*dm.noise_refiner, *dm.layers)],
    probe=lambda block, kind: block.attention.qkv,
)


class TestLumina2(FamilyContract, ObjectPatchIsUndone):
    spec = SPEC
