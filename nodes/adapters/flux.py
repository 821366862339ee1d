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

import weakref

import torch

from .base import (BlockAdapter, BlockGroup, channel_stride, modulate_rows_by_gain, reads_weights_directly,
                   reference_tokens, sampled_tail, token_stride)

# Where each FLUX.1 block keeps its own modulation, by block kind.
OWN_MODULATION = {"double_block": "img_mod", "single_block": "modulation"}

class StackedModulation:
    """FLUX.1 blocks own their modulation. A sampled module input needs, of
    each, the shift and 1 + scale of every stride-th channel: these rows of
    every block are stacked, so one addmm per model call gives them for all
    blocks instead of one small matmul per block. Made the first time a run
    needs it and dropped when the run ends (FluxAdapter.end_run), so its
    copy of those rows (1/18 of the modulation weights at FLUX.1-dev size)
    lives only as long as the run. A LoRA or hook that replaces a block's
    modulation parameters makes it rebuild."""

    def __init__(self, layers: dict, stride: int):
        self.layers = layers
        self.parameters = {key: (layer.weight, layer.bias) for key, layer in layers.items()}
        weights, biases, self.rows = [], [], {}
        start = 0
        for key, layer in layers.items():
            weight = layer.weight[0:2 * layer.in_features:stride]
            bias = layer.bias[0:2 * layer.in_features:stride].clone() if layer.bias is not None \
                else weight.new_zeros(weight.shape[0])
            bias[bias.shape[0] // 2:] += 1  # the scale half: 1 + scale
            weights.append(weight)
            biases.append(bias)
            self.rows[key] = (start, start + weight.shape[0])
            start += weight.shape[0]
        self.weight = torch.cat(weights)
        self.bias = torch.cat(biases)
        self._last: tuple | None = None

    def is_current(self) -> bool:
        return all(layer.weight is weight and layer.bias is bias
                   for (weight, bias), layer in zip(self.parameters.values(), self.layers.values()))

    def prepare(self, vec: torch.Tensor) -> None:
        """Compute every block's rows for this model call's `vec`."""
        if self._last is None or self._last[0] is not vec:
            self._last = (vec, torch.addmm(self.bias, torch.nn.functional.silu(vec), self.weight.t()))

    def shift_gain(self, key, vec: torch.Tensor):
        self.prepare(vec)
        start, end = self.rows[key]
        return self._last[1][:, start:end].chunk(2, dim=-1)


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
        return self._modulated_image(diffusion_model, kind, index, args, sampled=False)

    def sampled_module_input(self, diffusion_model, kind, index, args):
        return self._modulated_image(diffusion_model, kind, index, args, sampled=True)

    def _modulated_image(self, diffusion_model, kind, index, args, sampled: bool):
        block = self.block(diffusion_model, kind, index)
        norm = block.img_norm1 if kind == "double_block" else block.pre_norm
        image = args["img"]
        tokens, channels = image.shape[1], image.shape[2]
        tokens_step, channels_step = (token_stride(tokens), channel_stride(channels)) if sampled else (1, 1)
        shift, gain = self.image_shift_gain(diffusion_model, kind, index, block, args, channels_step)
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

    def __init__(self):
        # Per diffusion model during a run: its StackedModulation, or None
        # where some block's modulation cannot be read directly.
        self._stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def image_shift_gain(self, diffusion_model, kind, index, block, args, stride):
        # FLUX.1 blocks own their modulation; FLUX.2 blocks have none and get it in `vec`.
        modulation_layer = getattr(block, OWN_MODULATION[kind], None)
        if modulation_layer is None:
            return passed_in_shift_gain(kind, args["vec"], stride)
        vec = args["vec"]
        layer = getattr(modulation_layer, "lin", None)
        if not reads_weights_directly(layer, vec):
            modulation = modulation_layer(vec)[0]
            return modulation.shift[..., ::stride], 1 + modulation.scale[..., ::stride]
        if stride > 1:
            stack = self._stack(diffusion_model, vec, stride)
            if stack is not None:
                return stack.shift_gain((kind, index), vec)
        else:
            # The full module input is the first block's, taken once per model
            # call: the stacked rows the later blocks need are made with it.
            stack = self._stacks.get(diffusion_model)
            if stack is not None and stack.is_current():
                stack.prepare(vec)
        # Only the rows of the shift and scale channels, the first two of its
        # chunks (shift, scale, gate, ...).
        rows = slice(0, 2 * layer.in_features, stride)
        shift, scale = torch.nn.functional.linear(torch.nn.functional.silu(vec), layer.weight[rows],
                                                  None if layer.bias is None else layer.bias[rows]).chunk(2, dim=-1)
        return shift, 1 + scale

    def _stack(self, diffusion_model, vec, stride) -> StackedModulation | None:
        stack = self._stacks.get(diffusion_model, False)
        if stack is False or (stack is not None and not stack.is_current()):
            layers = {}
            for kind, index in self.block_keys(diffusion_model):
                layer = getattr(getattr(self.block(diffusion_model, kind, index), OWN_MODULATION[kind], None),
                                "lin", None)
                if not reads_weights_directly(layer, vec):
                    layers = None
                    break
                layers[(kind, index)] = layer
            stack = self._stacks[diffusion_model] = StackedModulation(layers, stride) if layers else None
        return stack

    def end_run(self, diffusion_model) -> None:
        self._stacks.pop(diffusion_model, None)


class ChromaAdapter(_FluxLikeAdapter):
    family = "chroma"
    model_classes = ("comfy.ldm.chroma.model.Chroma",)

    def image_shift_gain(self, diffusion_model, kind, index, block, args, stride):
        return passed_in_shift_gain(kind, args["vec"], stride)


ADAPTERS = (FluxAdapter(), ChromaAdapter())
