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
"""

from __future__ import annotations

import threading

import torch

from .base import (BlockAdapter, BlockGroup, channel_stride, modulate_rows_by_gain, reads_weights_directly,
                   reference_tokens, sampled_tail, token_stride)

# silu(vec) is taken once per model call, not once per block: every FLUX.1
# block of a call gets the same `vec` tensor. One entry per thread (core's
# MultiGPU node runs a model call per device in threads).
_LAST_SILU = threading.local()
# Per modulation parameter and row stride: the sampled rows' bias with 1
# added to the scale half, so one addmm gives shift and 1 + scale. By id,
# with the parameter kept to check it is the same one: a LoRA or hook that
# replaces the parameter gets a new entry.
_GAIN_BIAS_OF: dict = {}


def _silu(vec: torch.Tensor) -> torch.Tensor:
    last = getattr(_LAST_SILU, "entry", None)
    if last is None or last[0] is not vec:
        last = _LAST_SILU.entry = (vec, torch.nn.functional.silu(vec))
    return last[1]


def _gain_bias(layer, rows: slice) -> torch.Tensor:
    parameter = layer.bias if layer.bias is not None else layer.weight
    key = (id(parameter), rows.step)
    entry = _GAIN_BIAS_OF.get(key)
    if entry is None or entry[0] is not parameter:
        sampled = (layer.bias[rows] if layer.bias is not None
                   else layer.weight.new_zeros(layer.weight[rows].shape[0]))
        bias = sampled.clone()
        bias[bias.shape[0] // 2:] += 1
        entry = _GAIN_BIAS_OF[key] = (parameter, bias)
    return entry[1]


class _FluxLikeAdapter(BlockAdapter):
    """Flux and Chroma blocks share their norms and differ only in where the
    adaLN modulation of the image stream comes from."""

    block_groups = (
        BlockGroup("double_block", "double_blocks", ("img", "txt")),
        BlockGroup("single_block", "single_blocks", ("img",)),
    )

    def image_shift_gain(self, block, kind, args, stride: int):
        """The image stream's attention shift and gain (1 + scale), every `stride`-th channel."""
        raise NotImplementedError

    def module_input(self, diffusion_model, kind, index, args):
        """On a regular sample of the image tokens and channels (base.token_stride):
        only its norms are read."""
        block = self.block(diffusion_model, kind, index)
        norm = block.img_norm1 if kind == "double_block" else block.pre_norm
        image = args["img"]
        tokens, channels = image.shape[1], image.shape[2]
        tokens_step, channels_step = token_stride(tokens), channel_stride(channels)
        shift, gain = self.image_shift_gain(block, kind, args, channels_step)
        if gain.ndim == 2:
            gain, shift = gain[:, None], shift[:, None]
        normed = norm(image[:, ::tokens_step])[..., ::channels_step]
        return modulate_rows_by_gain(normed, gain, shift, sampled_tail(tokens, reference_tokens(args), tokens_step))


def passed_in_modulation(kind, vec):
    """The image stream's attention modulation, where the model computed it
    up front (Chroma, FLUX.2)."""
    if kind == "double_block":
        (image_modulation, _), _ = vec
        return image_modulation
    return vec


def passed_in_shift_gain(kind, vec, stride: int):
    modulation = passed_in_modulation(kind, vec)
    return modulation.shift[..., ::stride], 1 + modulation.scale[..., ::stride]


class FluxAdapter(_FluxLikeAdapter):
    family = "flux"
    model_classes = ("comfy.ldm.flux.model.Flux",)

    def image_shift_gain(self, block, kind, args, stride):
        # FLUX.1 blocks own their modulation; FLUX.2 blocks have none and get it in `vec`.
        modulation_layer = getattr(block, "img_mod" if kind == "double_block" else "modulation", None)
        if modulation_layer is None:
            return passed_in_shift_gain(kind, args["vec"], stride)
        vec = args["vec"]
        layer = getattr(modulation_layer, "lin", None)
        if not reads_weights_directly(layer, vec):
            modulation = modulation_layer(vec)[0]
            return modulation.shift[..., ::stride], 1 + modulation.scale[..., ::stride]
        # Only the rows of the sampled shift and scale channels, the first
        # two of its chunks (shift, scale, gate, ...): every stride-th row of
        # the first 2 * width is exactly those, in that order.
        rows = slice(0, 2 * layer.in_features, stride)
        return torch.addmm(_gain_bias(layer, rows), _silu(vec), layer.weight[rows].t()).chunk(2, dim=-1)


class ChromaAdapter(_FluxLikeAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)

    def image_shift_gain(self, block, kind, args, stride):
        return passed_in_shift_gain(kind, args["vec"], stride)


ADAPTERS = (FluxAdapter(), ChromaAdapter())
