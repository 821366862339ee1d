"""PixArt Alpha and Sigma (ComfyUI's PixArtMS).

The model has no `patches_replace` and drops `transformer_options` before
its blocks, so each block's `forward` is replaced and the runtime finds its
sampling session through a context variable.

Module input: the block's LayerNorm-ed image tokens modulated by
`scale_msa`/`shift_msa` from its own `scale_shift_table` plus the shared
timestep projection `t`, which is what its self-attention's qkv linear sees.
It costs one addition and a LayerNorm.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class PixArtAdapter(BlockAdapter):
    family = "pixart"
    model_classes = ("comfy.ldm.pixart.pixartms.PixArtMS",)
    block_groups = (BlockGroup("block", "blocks", ("x",), hook=FORWARD, outputs=("x",)),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x, t = args["x"], args["t"]
        table = block.scale_shift_table[None].to(dtype=x.dtype, device=x.device)
        shift_msa, scale_msa = (table + t.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(x) * (1 + scale_msa) + shift_msa


ADAPTERS = (PixArtAdapter(),)
