"""Flux (FLUX.1, Kontext, FLUX.2 dev and Klein, LongCat-Image: one class) and Chroma.

Module input: the block's adaLN-modulated, layer-normalised image stream,
as in the paper, on a regular sample of its tokens and channels. It costs
the sampled rows of the modulation matrix (FLUX.1; Chroma and FLUX.2 pass the
modulation in) and a LayerNorm of the sampled tokens, well under a
block's residual of traffic. Unlike the raw hidden state it carries the timestep,
whose change drives the output change that RFE scales and RCS watches for;
the raw hidden state of the first block does not depend on the timestep at all.

FLUX.2 (`global_modulation`) computes every block's modulation once and
passes it as `vec`, laid out as Chroma's: for double blocks
((image attention, image MLP), (text attention, text MLP)), for single blocks
one (shift, scale, gate). With reference images at timestep zero (Klein
edit, `index_timestep_zero`) each modulation has two rows per sample: the
reference tokens, the last tokens of the image stream, take the second.

Reference-image tokens (Kontext, Klein edit) are left out of the module
input: at the first block they are the same every step (a clean latent at
timestep zero), so they would only dilute the forecast error RCS reads by
their share of the tokens. Leaving them out also keeps the module input the
same when core's FluxKVCache drops them from the image stream after the
first step, keeping their K/V instead; `reference_image_num_tokens` still
counts them then, and the rotary table `pe` still has their positions,
which tells how many are gone (dropped_tail_tokens).
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup, channel_stride, reference_tokens, token_stride

# Where each FLUX.1 block keeps its own modulation, by block kind.
OWN_MODULATION = {"double_block": "img_mod", "single_block": "modulation"}

class _FluxLikeAdapter(BlockAdapter):
    """Flux and Chroma blocks share their norms and differ only in where the
    adaLN modulation of the image stream comes from."""

    block_groups = (
        BlockGroup("double_block", "double_blocks", ("img", "txt")),
        BlockGroup("single_block", "single_blocks", ("img",)),
    )

    def image_shift_gain(self, diffusion_model, kind, index, block, args, stride: int):
        """The image stream's attention shift and gain (1 + scale), every `stride`-th channel."""
        raise NotImplementedError

    def module_input(self, diffusion_model, kind, index, args):
        self.prepare_sampled_rows(diffusion_model, args["vec"])
        return self._modulated_image(diffusion_model, kind, index, args, sampled=False)

    def sampled_module_input(self, diffusion_model, kind, index, args):
        return self._modulated_image(diffusion_model, kind, index, args, sampled=True)

    def dropped_tail_tokens(self, kind, args) -> int:
        references = reference_tokens(args)
        positions = args.get("pe")
        if not references or positions is None:
            return 0
        # pe: (batch, 1, positions, ...) for the text and every image token.
        present = args["img"].shape[1] + (args["txt"].shape[1] if kind == "double_block" else 0)
        return min(references, max(0, positions.shape[2] - present))

    def _modulated_image(self, diffusion_model, kind, index, args, sampled: bool):
        block = self.block(diffusion_model, kind, index)
        norm = block.img_norm1 if kind == "double_block" else block.pre_norm
        image = args["img"]
        references = reference_tokens(args)
        present_references = references - self.dropped_tail_tokens(kind, args) if references else 0
        if present_references:
            image = image[:, :image.shape[1] - present_references]
        tokens, channels = image.shape[1], image.shape[2]
        tokens_step, channels_step = (token_stride(tokens), channel_stride(channels)) if sampled else (1, 1)
        shift, gain = self.image_shift_gain(diffusion_model, kind, index, block, args, channels_step)
        if gain.ndim == 2:
            gain, shift = gain[:, None], shift[:, None]
        normed = norm(image[:, ::tokens_step])[..., ::channels_step]
        if gain.shape[1] > 1:
            # The tokens left all take the first modulation row, the sample's own timestep.
            gain, shift = gain[:, :1], shift[:, :1]
        return torch.addcmul(shift, normed, gain)


def passed_in_modulation(kind, vec):
    """The image stream's attention modulation, where the model computed it
    up front (Chroma, FLUX.2)."""
    if kind == "double_block":
        (image_modulation, _), _ = vec
        return image_modulation
    return vec


def shift_gain(modulation, stride: int):
    """A ModulationOut's shift and gain (1 + scale), every `stride`-th channel."""
    return modulation.shift[..., ::stride], 1 + modulation.scale[..., ::stride]


class FluxAdapter(_FluxLikeAdapter):
    family = "flux"
    model_classes = ("comfy.ldm.flux.model.Flux",)

    def image_shift_gain(self, diffusion_model, kind, index, block, args, stride):
        # FLUX.1 blocks own their modulation; FLUX.2 blocks have none and get it in `vec`.
        modulation_layer = getattr(block, OWN_MODULATION[kind], None)
        if modulation_layer is None:
            return shift_gain(passed_in_modulation(kind, args["vec"]), stride)
        vec = args["vec"]
        stack = self.sampled_rows(diffusion_model, vec, stride, chunks=2, gain_from=1, width=args["img"].shape[-1])
        if stack is not None:
            return stack.rows_for((kind, index), vec)
        return shift_gain(modulation_layer(vec)[0], stride)

    def modulation_linear(self, diffusion_model, kind, index):
        return getattr(getattr(self.block(diffusion_model, kind, index), OWN_MODULATION[kind], None), "lin", None)


class ChromaAdapter(_FluxLikeAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)

    def image_shift_gain(self, diffusion_model, kind, index, block, args, stride):
        return shift_gain(passed_in_modulation(kind, args["vec"]), stride)


ADAPTERS = (FluxAdapter(), ChromaAdapter())
