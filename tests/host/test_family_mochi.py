"""Mochi. Its blocks do not update their inputs in place in this ComfyUI
(the residuals are `x + ...`); the copied-input check still guards the pack
against keeping the block's input alive across the call.

ComfyUI asserts the visual MLP width is Mochi's 12288, so the tiny model has
hidden size 128 with an MLP ratio of 96.
"""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec
from family_harness import InPlaceContract


def t5_conditioning(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, 8, 64, generator=generator)
    # Padded T5 tokens; model_base turns the mask into `num_tokens`, which
    # crops the text the visual tokens attend to.
    attention_mask = torch.ones(batch, 8, dtype=torch.long)
    attention_mask[:, 6:] = 0
    return [[cross, {"attention_mask": attention_mask}]]


MOCHI = FamilySpec(
    name="mochi",
    config_class="GenmoMochi",
    unet_config={
        "image_model": "mochi_preview", "patch_size": 2, "in_channels": 12, "hidden_size_x": 128,
        "hidden_size_y": 64, "depth": 2, "num_heads": 2, "mlp_ratio_x": 96.0, "mlp_ratio_y": 4.0,
        "learn_sigma": False, "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0,
        "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
        "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 64,
        "t5_token_length": 8, "rope_theta": 10000.0,
    },
    latent_shape=(12, 4, 8, 8),
    conditioning=t5_conditioning,
    probe=lambda block, kind: block.attn.qkv_x,
)


class TestMochi(FamilyContract, InPlaceContract):
    spec = MOCHI
    updates_inputs_in_place = False
