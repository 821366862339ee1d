"""Ideogram 4 (`Ideogram4Transformer2DModel`).

The model has no `patches_replace`, so each of its `layers` is reached by
replacing the layer's `forward`.

Module input: what the layer feeds its attention's qkv linear, the
RMS-normalised packed [text, image] sequence scaled by `1 + scale_msa`,
with no shift: the layer's adaLN gives only scales and gates. The
modulation is one small linear on the timestep's `adaln_input`.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class Ideogram4Adapter(BlockAdapter):
    family = "ideogram4"
    model_classes = ("comfy.ldm.ideogram4.model.Ideogram4Transformer2DModel",)
    block_groups = (BlockGroup("layer", "layers", ("x",), hook=FORWARD),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        scale_msa = block.adaln_modulation(args["adaln_input"]).chunk(4, dim=-1)[0]
        return block.attention_norm1(args["x"]) * (1 + scale_msa)


ADAPTERS = (Ideogram4Adapter(),)
