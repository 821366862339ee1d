"""Wan 2.1 and 2.2 (text/image-to-video, TI2V, FunControl) and the variants
built on the same `WanAttentionBlock`: VACE, Camera, S2V, HuMo and Animate.

Every variant runs `self.blocks` through `patches_replace["dit"][("double_block", i)]`
and reads only "img" back. What a variant does between blocks (VACE's
`x += c_skip`, S2V's in-place audio injection, Animate's face fuser) happens
outside the patch, on whatever tensor the patch returned.

Module input: what the block's self-attention receives, the adaLN-modulated
`norm1(x)`. The modulation `e0` is (batch, 6, dim) for VACE and Camera and
(batch, frames, 6, dim) for the others, where Wan 2.2 TI2V gives each latent
frame its own timestep; per-frame shift and scale are spread over that
frame's tokens as the block does. Blocks after the first take it on a
regular sample of tokens and channels (BlockAdapter.sampled_module_input),
each sampled token with its own frame's modulation.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup, channel_stride, token_stride


def spread_over_tokens(modulation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block's `repeat_e`: a (batch, frames, dim) modulation repeated so
    each frame's value covers its tokens; a single frame broadcasts as is.
    Extra tokens past the last whole frame (S2V's reference and motion
    tokens) take the last frame's value."""
    frames = modulation.size(1)
    repeats = tokens_per_frame(x.size(1), frames) if frames > 1 else 1
    if repeats == 1:
        return modulation
    return torch.repeat_interleave(modulation, repeats, dim=1)[:, :x.size(1)]


def tokens_per_frame(tokens: int, frames: int) -> int:
    """How many tokens each frame's modulation covers: a whole share, or one
    more where tokens do not divide evenly (the last frame then covers the rest)."""
    repeats = tokens // frames
    return repeats if repeats * frames == tokens else repeats + 1


class WanAdapter(BlockAdapter):
    family = "wan"
    # Subclasses match anyway; the variants are named because each was
    # checked to keep the base block interface and patch arguments.
    model_classes = (
        "comfy.ldm.wan.model.WanModel",
        "comfy.ldm.wan.model.VaceWanModel",
        "comfy.ldm.wan.model.CameraWanModel",
        "comfy.ldm.wan.model.WanModel_S2V",
        "comfy.ldm.wan.model.HumoWanModel",
        "comfy.ldm.wan.model_animate.AnimateWanModel",
    )
    block_groups = (BlockGroup("double_block", "blocks", ("img",)),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["img"]
        shift, scale = attention_shift_scale(block, x, args["vec"], channels_step=1)
        return torch.addcmul(spread_over_tokens(shift, x), block.norm1(x), 1 + spread_over_tokens(scale, x))

    def sampled_module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["img"]
        tokens_step, channels_step = token_stride(x.size(1)), channel_stride(x.size(2))
        shift, scale = attention_shift_scale(block, x, args["vec"], channels_step)
        if shift.size(1) > 1:
            frame = sampled_frames(x.size(1), shift.size(1), tokens_step, x.device)
            shift, scale = shift.index_select(1, frame), scale.index_select(1, frame)
        return torch.addcmul(shift, block.norm1(x[:, ::tokens_step])[..., ::channels_step], 1 + scale)


def attention_shift_scale(block, x: torch.Tensor, e0: torch.Tensor, channels_step: int):
    """The block's self-attention shift and scale, (batch, frames, dim / channels_step)
    each: only the first two of its six modulations, which added alone give
    the values the block gets from all six."""
    learned = block.modulation[:, :2, ::channels_step].to(dtype=x.dtype, device=x.device)
    if e0.ndim < 4:
        return (learned + e0[:, :2, ::channels_step]).chunk(2, dim=1)
    return (learned.unsqueeze(0) + e0[:, :, :2, ::channels_step]).unbind(2)


def sampled_frames(tokens: int, frames: int, stride: int, device) -> torch.Tensor:
    """The frame of every stride-th token, as `spread_over_tokens` assigns them."""
    repeats = tokens_per_frame(tokens, frames)
    return (torch.arange(0, tokens, stride, device=device) // repeats).clamp_(max=frames - 1)


ADAPTERS = (WanAdapter(),)
