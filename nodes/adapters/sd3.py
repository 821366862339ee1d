"""SD3, SD3.5 Large and Medium (MMDiT joint blocks).

The last joint block's context half is `pre_only` and returns txt None; the
runtime keeps such a stream out of the cache.

Module input: the x half's adaLN-modulated norm1 input to its joint attention
qkv. The modulation layout depends on the block variant: 9 chunks with the
SD3.5 Medium extra self-attention (`x_block_self_attn`, whose second attention
reads the same norm1 output with other chunks), 4 with `scale_mod_only`
(no shift), 6 otherwise.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup


def _attention_shift_and_scale(x_block, modulation: torch.Tensor):
    if x_block.x_block_self_attn:
        shift, scale = modulation.chunk(9, dim=1)[:2]
    elif x_block.scale_mod_only:
        shift, scale = None, modulation.chunk(4, dim=1)[0]
    else:
        shift, scale = modulation.chunk(6, dim=1)[:2]
    return shift, scale


class SD3Adapter(BlockAdapter):
    family = "sd3"
    model_classes = ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",)
    block_groups = (BlockGroup("double_block", "joint_blocks", ("img", "txt")),)

    def module_input(self, diffusion_model, kind, index, args):
        x_block = self.block(diffusion_model, kind, index).x_block
        shift, scale = _attention_shift_and_scale(x_block, x_block.adaLN_modulation(args["vec"]))
        normed = x_block.norm1(args["img"])
        if shift is None:
            return normed * (1 + scale.unsqueeze(1))
        return torch.addcmul(shift.unsqueeze(1), normed, 1 + scale.unsqueeze(1))


ADAPTERS = (SD3Adapter(),)
