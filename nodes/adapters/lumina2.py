"""Lumina Image 2.0 and Z-Image: both are ComfyUI's NextDiT.

NextDiT has no `patches_replace`, so its blocks are reached by replacing
each block's `forward`. Cached: the noise refiners (modulated blocks on the
image tokens alone, which run first) and the main `layers` on the joint
sequence. The first noise refiner therefore takes each evaluation's
decision. Not cached: the context refiners (and Z-Image Omni's SigLIP
refiner), which see no timestep and only the caption, and cost about 0.004
of an evaluation at Z-Image's size (256 caption against 4096 image tokens).

Module input: the block's RMS-normalised joint sequence scaled by its own
adaLN `scale_msa`, which is exactly what it feeds its attention's qkv linear.
The modulation is one small linear on the timestep embedding, after a SiLU
in Lumina 2 and without one in Z-Image. Blocks after the first take it on a
regular sample of tokens and channels, with the sampled rows of every
block's adaLN linear stacked into one matmul per model call
(base.SampledRows), in both layouts.
"""

from __future__ import annotations

import torch

from .base import FORWARD, BlockAdapter, BlockGroup, channel_stride, sample_of, token_stride


def _scale_tokens(normed: torch.Tensor, scale: torch.Tensor, zero_timestep_spans) -> torch.Tensor:
    """`normed * (1 + scale)` per sample, as NextDiT's `modulate` does. Newer
    ComfyUI (Z-Image Omni) runs the timestep embedding at two timesteps, the
    second half of the batch at t = 0, and scales the token spans listed in
    `timestep_zero_index` with that half and every other token with the first."""
    factor = 1 + scale.unsqueeze(1)
    if zero_timestep_spans is None:
        return normed * factor
    half = factor.shape[0] // 2
    per_token = factor[:half].expand_as(normed).clone()
    for start, end in zero_timestep_spans:
        per_token[:, start:end] = factor[half:]
    return normed * per_token


class Lumina2Adapter(BlockAdapter):
    family = "lumina2"
    model_classes = ("comfy.ldm.lumina.model.NextDiT",)
    block_groups = (BlockGroup("noise_refiner", "noise_refiner", ("x",), hook=FORWARD, outputs=("x",)),
                    BlockGroup("layer", "layers", ("x",), hook=FORWARD, outputs=("x",)))

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        scale_msa = block.adaLN_modulation(args["adaln_input"]).chunk(4, dim=1)[0]
        self.prepare_sampled_rows(diffusion_model, args["adaln_input"])
        return _scale_tokens(block.attention_norm1(args["x"]), scale_msa, args.get("timestep_zero_index"))

    def sampled_module_input(self, diffusion_model, kind, index, args):
        x, conditioning = args["x"], args["adaln_input"]
        tokens_step, channels_step = token_stride(x.shape[1]), channel_stride(x.shape[2])
        block = self.block(diffusion_model, kind, index)
        stack = self.sampled_rows(diffusion_model, conditioning, channels_step, chunks=1, gain_from=0,
                                  width=x.shape[-1], activate=_has_silu(block))
        if stack is None or args.get("timestep_zero_index") is not None:
            return sample_of(self.module_input(diffusion_model, kind, index, args), tokens_step, channels_step)
        (gain,) = stack.rows_for((kind, index), conditioning)
        normed = block.attention_norm1(x[:, ::tokens_step])
        return normed[..., ::channels_step] * gain.unsqueeze(1)

    def modulation_linear(self, diffusion_model, kind, index):
        modulation = getattr(self.block(diffusion_model, kind, index), "adaLN_modulation", None)
        return modulation[-1] if isinstance(modulation, torch.nn.Sequential) and len(modulation) in (1, 2) else None


def _has_silu(block) -> bool:
    """Lumina 2's adaLN is Sequential(SiLU, Linear), Z-Image's Sequential(Linear)."""
    return len(block.adaLN_modulation) == 2


ADAPTERS = (Lumina2Adapter(),)
