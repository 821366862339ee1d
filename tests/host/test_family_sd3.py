"""SD3 / SD3.5 (MMDiT joint blocks): streams (img, txt); the last block's
context half is pre_only and returns txt None.

The main spec is SD3.5 Medium style (qk_norm, an extra x self-attention in
block 0); a second spec covers the `scale_mod_only` modulation layout."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec

SD35_MEDIUM_CONFIG = {
    "in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 2,
    "adm_in_channels": 32, "context_embedder_config": {"target": "torch.nn.Linear",
                                                       "params": {"in_features": 32, "out_features": 128}},
    "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms", "x_block_self_attn_layers": [0],
}

SCALE_MOD_ONLY_CONFIG = {
    key: value for key, value in SD35_MEDIUM_CONFIG.items() if key not in ("qk_norm", "x_block_self_attn_layers")
} | {"scale_mod_only": True}


def sd3_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, 6, 32, generator=generator)
    return [[cross, {"pooled_output": torch.randn(batch, 32, generator=generator)}]]


def x_block_qkv(block, kind):
    return block.x_block.attn.qkv


def fill_position_embedding(diffusion_model):
    """pos_embed is a buffer, which the tiny model builder leaves uninitialised."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        diffusion_model.pos_embed.copy_(torch.randn(diffusion_model.pos_embed.shape, generator=generator) * 0.1)


SPEC = FamilySpec(
    name="sd3",
    config_class="SD3",
    unet_config=SD35_MEDIUM_CONFIG,
    latent_shape=(16, 16, 16),
    conditioning=sd3_conditioning,
    probe=x_block_qkv,
    prepare=fill_position_embedding,
)

SCALE_MOD_ONLY_SPEC = FamilySpec(
    name="sd3",
    config_class="SD3",
    unet_config=SCALE_MOD_ONLY_CONFIG,
    latent_shape=(16, 16, 16),
    conditioning=sd3_conditioning,
    probe=x_block_qkv,
    prepare=fill_position_embedding,
)


class TestSD35Medium(FamilyContract):
    spec = SPEC


class TestSD3ScaleModOnly(FamilyContract):
    spec = SCALE_MOD_ONLY_SPEC


def test_the_last_block_returns_no_text_stream(comfy):
    from tiny_models import build

    diffusion_model = build(SPEC.config_class, SPEC.unet_config).model.diffusion_model
    blocks = diffusion_model.joint_blocks
    assert [block.context_block.pre_only for block in blocks] == [False] * (len(blocks) - 1) + [True]
    assert blocks[0].x_block.x_block_self_attn
