"""Flux (FLUX.1, Kontext, FLUX.2 dev and Klein, LongCat-Image: one class) and Chroma.

Module input: the block's adaLN-modulated, layer-normalised image stream,
as in the paper. It costs one small linear on the conditioning vector (FLUX.1)
or nothing (Chroma and FLUX.2 pass the modulation in) plus a LayerNorm, a few
percent of the block. Unlike the raw hidden state it carries the timestep,
whose change drives the output change that RFE scales and RCS watches for;
the raw hidden state of the first block does not depend on the timestep at all.

FLUX.2 (`global_modulation`) computes every block's modulation once and
passes it as `vec`, laid out as Chroma's: for double blocks
((image attention, image MLP), (text attention, text MLP)), for single blocks
one (shift, scale, gate). With reference images at timestep zero (Klein
edit, `index_timestep_zero`) each modulation has two rows per sample: the
reference tokens, the last tokens of the image stream, take the second.
"""

from __future__ import annotations

from .base import BlockAdapter, BlockGroup, modulate_rows, reference_tokens


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
        scale, shift = modulation.scale, modulation.shift
        if scale.ndim == 2:
            scale, shift = scale[:, None], shift[:, None]
        return modulate_rows(norm(args["img"]), scale, shift, reference_tokens(args))


def passed_in_modulation(kind, vec):
    """The image stream's attention modulation, where the model computed it
    up front (Chroma, FLUX.2)."""
    if kind == "double_block":
        (image_modulation, _), _ = vec
        return image_modulation
    return vec


class FluxAdapter(_FluxLikeAdapter):
    family = "flux"
    model_classes = ("comfy.ldm.flux.model.Flux",)

    def image_modulation(self, block, kind, args):
        # FLUX.1 blocks own their modulation; FLUX.2 blocks have none and get it in `vec`.
        modulation_layer = getattr(block, "img_mod" if kind == "double_block" else "modulation", None)
        if modulation_layer is None:
            return passed_in_modulation(kind, args["vec"])
        return modulation_layer(args["vec"])[0]


class ChromaAdapter(_FluxLikeAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)

    def image_modulation(self, block, kind, args):
        return passed_in_modulation(kind, args["vec"])


ADAPTERS = (FluxAdapter(), ChromaAdapter())
