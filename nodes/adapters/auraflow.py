"""AuraFlow (MMDiT double layers, then single layers on [text, image]).

Module input: the image stream's adaLN-modulated LayerNorm input to the
attention projections; in single layers the joint text+image sequence, which
is what those layers modulate and attend over as one stream.
"""

from __future__ import annotations

from .base import BlockAdapter, BlockGroup


class AuraFlowAdapter(BlockAdapter):
    family = "auraflow"
    model_classes = ("comfy.ldm.aura.mmdit.MMDiT",)
    block_groups = (
        BlockGroup("double_block", "double_layers", ("img", "txt")),
        BlockGroup("single_block", "single_layers", ("img",)),
    )

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        if kind == "double_block":
            modulation, norm = block.modX, block.normX1
        else:
            modulation, norm = block.modCX, block.norm1
        shift, scale = modulation(args["vec"]).chunk(6, dim=1)[:2]
        return norm(args["img"]) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


ADAPTERS = (AuraFlowAdapter(),)
