"""HunyuanDiT 1.0-1.2 (U-ViT style: long skip connections).

Blocks in the first half save their output for a block of the second half,
which gets it as `skip`. The model saves whatever the patch returns, so a
predicted output becomes the later block's skip exactly as a computed one
would; `skip` is an input, not a stream (the block returns only img), and the
pack passes it through untouched.

Module input: what the self-attention's qkv projection sees. The block has no
adaLN scale: it adds a projection of the conditioning vector to an affine
LayerNorm. Second-half blocks first fuse the skip into their input
(skip_norm, skip_linear), which this repeats: one linear from 2*hidden to
hidden over the image tokens, the price of an input that moves with the skip.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup


class HunyuanDiTAdapter(BlockAdapter):
    family = "hunyuan_dit"
    model_classes = ("comfy.ldm.hydit.models.HunYuanDiT",)
    block_groups = (BlockGroup("double_block", "blocks", ("img",)),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["img"]
        if block.skip_linear is not None:
            joined = torch.cat([x, args["skip"]], dim=-1).to(x.dtype)
            x = block.skip_linear(block.skip_norm(joined))
        return block.norm1(x) + block.default_modulation(args["vec"]).unsqueeze(1)


ADAPTERS = (HunyuanDiTAdapter(),)
