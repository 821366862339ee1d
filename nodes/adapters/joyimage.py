"""JoyImage (`JoyImageTransformer3DModel`): double blocks through
`patches_replace["dit"]["double_block"]`, streams img and txt.

Module input: what the block feeds its joint attention for the image, the
layer-normalised image stream modulated by the first shift and scale of
the block's `img_mod`, its learned table plus the (batch, 6, dim) timestep
projection passed in as `vec`.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup


class JoyImageAdapter(BlockAdapter):
    family = "joyimage"
    model_classes = ("comfy.ldm.joyimage.model.JoyImageTransformer3DModel",)
    block_groups = (BlockGroup("double_block", "double_blocks", ("img", "txt")),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        shift, scale = block.img_mod(args["vec"])[:2]
        return torch.addcmul(shift.unsqueeze(1), block.img_norm1(args["img"]), 1 + scale.unsqueeze(1))


ADAPTERS = (JoyImageAdapter(),)
