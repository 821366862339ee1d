"""Mochi (Genmo AsymmDiT).

Module input: what the block feeds its visual qkv projection, the weightless
RMS norm of the visual tokens scaled by 1 + scale_msa_x, the first quarter of
the block's `mod_x(silu(c))`. Mochi modulates by scale only, no shift.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup

# asymm_models_joint.modulated_rmsnorm's default, which the block uses.
RMS_NORM_EPS = 1e-6


class MochiAdapter(BlockAdapter):
    family = "mochi"
    model_classes = ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",)
    block_groups = (BlockGroup("double_block", "blocks", ("img", "txt")),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["img"]
        scale_msa = block.mod_x(torch.nn.functional.silu(args["vec"])).chunk(4, dim=1)[0]
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=RMS_NORM_EPS) * (1 + scale_msa.unsqueeze(1))


ADAPTERS = (MochiAdapter(),)
