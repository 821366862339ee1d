"""Flux (and Kontext, which shares its class) and Chroma.

Module input: the block's adaLN-modulated, layer-normalised image stream,
as in the paper. It costs one small linear on the conditioning vector (Flux)
or nothing (Chroma passes the modulation in) plus a LayerNorm, a few percent
of the block. Unlike the raw hidden state it carries the timestep, whose
change drives the output change that RFE scales and RCS watches for; the raw
hidden state of the first block does not depend on the timestep at all.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter

FLUX_GROUPS = (
    ("double_block", "double_blocks", ("img", "txt")),
    ("single_block", "single_blocks", ("img",)),
)


def _modulate(normalised: torch.Tensor, modulation) -> torch.Tensor:
    return normalised * (1 + modulation.scale) + modulation.shift


class FluxAdapter(BlockAdapter):
    family = "flux"
    model_classes = ("comfy.ldm.flux.model.Flux",)
    block_groups = FLUX_GROUPS

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        if kind == "double_block":
            modulation = block.img_mod(args["vec"])[0]
            return _modulate(block.img_norm1(args["img"]), modulation)
        modulation = block.modulation(args["vec"])[0]
        return _modulate(block.pre_norm(args["img"]), modulation)


class ChromaAdapter(BlockAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)
    block_groups = FLUX_GROUPS

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        if kind == "double_block":
            (image_modulation, _), _ = args["vec"]
            return _modulate(block.img_norm1(args["img"]), image_modulation)
        return _modulate(block.pre_norm(args["img"]), args["vec"])
