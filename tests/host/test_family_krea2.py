"""Krea 2: object-patched single-stream blocks over [text, image], with and
without `index_timestep_zero` reference images."""

from __future__ import annotations

import dataclasses

import torch

from family_harness import FamilyContract, FamilySpec, ObjectPatchIsUndone

KREA2_CONFIG = {
    "image_model": "krea2", "features": 64, "heads": 2, "kvheads": 1, "multiplier": 4, "layers": 2, "patch": 2,
    "channels": 16, "txtdim": 32, "txtlayers": 3, "txtheads": 2, "txtkvheads": 2,
}


def krea2_conditioning(batch: int, seed: int, tokens: int = 6) -> list:
    """Caption features of every text-encoder layer the text fusion mixes:
    txtlayers x txtdim of them per token."""
    cross = torch.randn(batch, tokens, 3 * 32, generator=torch.Generator().manual_seed(seed))
    return [[cross, {}]]


SPEC = FamilySpec(
    name="krea2",
    config_class="Krea2",
    unet_config=KREA2_CONFIG,
    latent_shape=(16, 1, 8, 8),
    conditioning=krea2_conditioning,
    counted_modules=lambda dm: [block.attn for block in dm.blocks],
    probe=lambda block, kind: block.attn.wq,
)


class TestKrea2(FamilyContract, ObjectPatchIsUndone):
    spec = SPEC


def reference_conditioning(batch: int, seed: int) -> list:
    """One reference image, modulated at t = 0: the blocks get a timestep
    vector of twice the batch and the index where the reference tokens start."""
    [[cross, extras]] = krea2_conditioning(batch, seed)
    reference = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    return [[cross, {**extras, "reference_latents": [reference], "reference_latents_method": "index_timestep_zero"}]]


REFERENCE_SPEC = dataclasses.replace(SPEC, conditioning=reference_conditioning)


class TestKrea2TimestepZeroReference(FamilyContract, ObjectPatchIsUndone):
    spec = REFERENCE_SPEC
