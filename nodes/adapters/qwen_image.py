"""Qwen-Image (and Qwen-Image-Edit, which shares its class).

Module input: the image stream's adaLN-modulated, layer-normalised input, as
the block computes it for its attention's image query/key/value projections.
Edit reference-latent tokens are appended to the image stream and are part of it.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup


class QwenImageAdapter(BlockAdapter):
    family = "qwen_image"
    model_classes = ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",)
    block_groups = (BlockGroup("double_block", "transformer_blocks", ("img", "txt")),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        # img_mod gives 6 chunks: shift, scale, gate for attention, then for the MLP.
        attention_modulation = block.img_mod(args["vec"]).chunk(2, dim=-1)[0]
        shift, scale, _ = attention_modulation.chunk(3, dim=-1)
        return torch.addcmul(shift.unsqueeze(1), block.img_norm1(args["img"]), 1 + scale.unsqueeze(1))


ADAPTERS = (QwenImageAdapter(),)
