"""LTXV (Lightricks LTX-Video).

Module input: what the block feeds its self-attention, the weightless RMS
norm of the hidden state modulated by the first shift and scale of the
block's `scale_shift_table` plus the adaLN-single timestep embedding (per
sample, or per token when the timestep is). The block adds every residual
to its input in place; this adapter only reads it.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup

# comfy.ldm.common_dit.rms_norm's default, which the block uses.
RMS_NORM_EPS = 1e-6


class LTXVAdapter(BlockAdapter):
    family = "ltxv"
    model_classes = ("comfy.ldm.lightricks.model.LTXVModel",)
    block_groups = (BlockGroup("double_block", "transformer_blocks", ("img",)),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x, timestep = args["img"], args["vec"]
        table = block.scale_shift_table.to(device=x.device, dtype=x.dtype)
        # Rows 0 and 1 of the six are shift_msa and scale_msa.
        per_token = timestep.reshape(x.shape[0], timestep.shape[1], table.shape[0], -1)[:, :, :2]
        shift, scale = (table[None, None, :2] + per_token).unbind(dim=2)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=RMS_NORM_EPS) * (1 + scale) + shift


ADAPTERS = (LTXVAdapter(),)
