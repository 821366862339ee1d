"""Lens: Qwen-Image-style double blocks with an RMS-normalised image stream;
the text encoder's layers arrive side by side in one context tensor."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec


def multi_layer_text(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    # Four encoder layers of 16 features each, split per layer by the model.
    return [[torch.randn(batch, 6, 64, generator=generator), {"attention_mask": torch.ones(1, 6, dtype=torch.long)}]]


SPEC = FamilySpec(
    name="lens", config_class="Lens",
    unet_config={"image_model": "lens", "in_channels": 128, "out_channels": 32, "patch_size": 2, "num_layers": 2,
                 "attention_head_dim": 32, "num_attention_heads": 2, "enc_hidden_dim": 16,
                 "axes_dims_rope": [8, 12, 12], "multi_layer_encoder_feature": True,
                 "selected_layer_index": [0, 1, 2, 3]},
    latent_shape=(128, 4, 4),
    conditioning=multi_layer_text,
    probe=lambda block, kind: block.attn.img_qkv,
)


class TestLens(FamilyContract):
    spec = SPEC
