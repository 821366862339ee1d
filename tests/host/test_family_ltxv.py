"""LTXV: every residual of its block is added to the input in place.

Two variants: one timestep per sample, and one per token, which LTXV uses
when part of the latent is a conditioning frame (a denoise mask).
"""

from __future__ import annotations

import dataclasses

import torch

from family_harness import FamilyContract, FamilySpec
from family_harness import InPlaceContract

LATENT_SHAPE = (8, 4, 4, 4)


def t5_conditioning(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, 8, 32, generator=generator)
    # T5 pads its tokens; ComfyUI's encoder returns the mask with them.
    attention_mask = torch.ones(batch, 8, dtype=torch.long)
    attention_mask[:, 6:] = 0
    return [[cross, {"attention_mask": attention_mask}]]


def first_frame_kept(batch, seed):
    """As LTXV's image-to-video nodes condition it: the first frame is kept
    (mask 0), so its tokens get their own timestep."""
    [[cross, extras]] = t5_conditioning(batch, seed)
    mask = torch.ones(batch, 1, *LATENT_SHAPE[1:])
    mask[:, :, 0] = 0.0
    return [[cross, {**extras, "concat_mask": mask}]]


LTXV = FamilySpec(
    name="ltxv",
    config_class="LTXV",
    unet_config={
        "image_model": "ltxv", "in_channels": 8, "num_attention_heads": 2, "attention_head_dim": 32,
        "cross_attention_dim": 64, "caption_channels": 32, "num_layers": 2,
    },
    latent_shape=LATENT_SHAPE,
    conditioning=t5_conditioning,
    probe=lambda block, kind: block.attn1.to_q,
)

LTXV_PER_TOKEN_TIMESTEP = dataclasses.replace(LTXV, conditioning=first_frame_kept)


class TestLTXV(FamilyContract, InPlaceContract):
    spec = LTXV


class TestLTXVPerTokenTimestep(FamilyContract, InPlaceContract):
    spec = LTXV_PER_TOKEN_TIMESTEP
