"""Kandinsky 5 video and image (`Kandinsky5`).

The model has a `patches_replace["dit"]["double_block"]` point, but it is
unusable: its `original_block` calls the block with `x=` and `context=`
where the block's forward takes `visual_embed` and `text_embed`, and the
model then indexes the bare tensor it returns with "x". A patch that calls
it fails, so the visual blocks' `forward` is object-patched instead. The
text blocks run once per evaluation on the caption only and are not cached.

Module input: what the block feeds its self-attention, the layer-normalised
visual tokens modulated by the first shift and scale of its
`visual_modulation` of the time embedding.
"""

from __future__ import annotations

import torch

from .base import FORWARD, BlockAdapter, BlockGroup


class Kandinsky5Adapter(BlockAdapter):
    family = "kandinsky5"
    model_classes = ("comfy.ldm.kandinsky5.model.Kandinsky5",)
    block_groups = (BlockGroup("visual_block", "visual_transformer_blocks", ("visual_embed",), hook=FORWARD),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        self_attention = block.visual_modulation(args["time_embed"]).chunk(3, dim=-1)[0]
        shift, scale, _ = self_attention.unsqueeze(1).chunk(3, dim=-1)
        return torch.addcmul(shift, block.self_attention_norm(args["visual_embed"]), 1 + scale)


ADAPTERS = (Kandinsky5Adapter(),)
