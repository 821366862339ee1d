"""Flux (and Kontext, which shares its class) and Chroma.

Module input: the block's adaLN-modulated, layer-normalised image stream,
as in the paper. It costs one small linear on the conditioning vector (Flux)
or nothing (Chroma passes the modulation in) plus a LayerNorm, a few percent
of the block. Unlike the raw hidden state it carries the timestep, whose
change drives the output change that RFE scales and RCS watches for; the raw
hidden state of the first block does not depend on the timestep at all.
"""

from __future__ import annotations

from .base import BlockAdapter, BlockGroup


class _FluxLikeAdapter(BlockAdapter):
    """Flux and Chroma blocks share their norms and differ only in where the
    adaLN modulation of the image stream comes from."""

    block_groups = (
        BlockGroup("double_block", "double_blocks", ("img", "txt")),
        BlockGroup("single_block", "single_blocks", ("img",)),
    )

    def image_modulation(self, block, kind, args):
        raise NotImplementedError

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        norm = block.img_norm1 if kind == "double_block" else block.pre_norm
        modulation = self.image_modulation(block, kind, args)
        return norm(args["img"]) * (1 + modulation.scale) + modulation.shift


class FluxAdapter(_FluxLikeAdapter):
    family = "flux"
    model_classes = ("comfy.ldm.flux.model.Flux",)

    def image_modulation(self, block, kind, args):
        modulation_layer = block.img_mod if kind == "double_block" else block.modulation
        return modulation_layer(args["vec"])[0]


class ChromaAdapter(_FluxLikeAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)

    def image_modulation(self, block, kind, args):
        # Chroma computes every block's modulation up front and passes it as `vec`.
        if kind == "double_block":
            (image_modulation, _), _ = args["vec"]
            return image_modulation
        return args["vec"]


ADAPTERS = (FluxAdapter(), ChromaAdapter())
