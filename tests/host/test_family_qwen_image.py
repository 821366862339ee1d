"""Qwen-Image: one stream pair (img, txt) per block; the block returns
(txt, img) and the patch a dict. Its latent is 5-D with one frame."""

from __future__ import annotations

import dataclasses
import inspect

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


def edit_2511_conditioning(batch: int, seed: int) -> list:
    """One reference image, which Qwen-Image-Edit-2511 modulates at t = 0."""
    [[cross, extras]] = qwen_image_conditioning(batch, seed)
    reference = torch.randn(1, 16, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    return [[cross, {**extras, "reference_latents": [reference]}]]


def without_timestep_zero():
    import comfy.ldm.qwen_image.model

    parameters = inspect.signature(comfy.ldm.qwen_image.model.QwenImageTransformer2DModel).parameters
    return None if "default_ref_method" in parameters else "Qwen-Image-Edit-2511: not in this ComfyUI"


# Edit-2511's checkpoint makes `index_timestep_zero` the model's default
# reference method (ComfyUI detects it from an `__index_timestep_zero__` key).
EDIT_2511 = dataclasses.replace(SPEC, unet_config={**QWEN_IMAGE_CONFIG, "default_ref_method": "index_timestep_zero"},
                                conditioning=edit_2511_conditioning, unsupported=without_timestep_zero)


class TestQwenImageEdit2511(FamilyContract):
    spec = EDIT_2511
