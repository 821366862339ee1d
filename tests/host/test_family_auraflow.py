"""AuraFlow: double layers on (img, txt), then single layers on the joint
[txt, img] sequence."""

from __future__ import annotations

import torch

from family_harness import FamilyContract, FamilySpec

AURAFLOW_CONFIG = {
    "cond_seq_dim": 32, "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_heads": 2,
    "global_conddim": 64, "n_layers": 3, "n_double_layers": 2, "max_seq": 64,
}


def auraflow_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 6, 32, generator=generator), {}]]


def attention_input_projection(block, kind):
    return block.attn.w2q if kind == "double_block" else block.attn.w1q


SPEC = FamilySpec(
    name="auraflow",
    config_class="AuraFlow",
    unet_config=AURAFLOW_CONFIG,
    latent_shape=(4, 16, 16),
    conditioning=auraflow_conditioning,
    probe=attention_input_projection,
)


class TestAuraFlow(FamilyContract):
    spec = SPEC
