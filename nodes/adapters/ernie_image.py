"""ERNIE-Image (`ErnieImageModel`).

The model has no `patches_replace` and no DIFFUSION_MODEL wrapper, and
passes its `layers` no transformer options, so each layer's `forward` is
object-patched and finds its session through the APPLY_MODEL wrapper's
context.

Module input: what the layer feeds its self-attention's projections, the
RMS-normalised joint [image, text] sequence modulated by `shift_msa` and
`scale_msa`. The model computes the modulation once from the timestep and
passes every layer the same list `temb` of (shift_msa, scale_msa, gate_msa,
shift_mlp, scale_mlp, gate_mlp), so it costs nothing here.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class ErnieImageAdapter(BlockAdapter):
    family = "ernie_image"
    model_classes = ("comfy.ldm.ernie.model.ErnieImageModel",)
    block_groups = (BlockGroup("layer", "layers", ("x",), hook=FORWARD),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        shift_msa, scale_msa = args["temb"][:2]
        return block.adaLN_sa_ln(args["x"]) * (1 + scale_msa) + shift_msa


ADAPTERS = (ErnieImageAdapter(),)
