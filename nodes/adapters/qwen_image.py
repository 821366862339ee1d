"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2511 (one class).

Module input: the image stream's adaLN-modulated, layer-normalised input, as
the block computes it for its attention's image query/key/value projections.
Edit reference-latent tokens are appended to the image stream and are part
of it. With `index_timestep_zero` (Edit-2511) the timestep embedding `vec`
has twice the batch: the second half, the embedding at t = 0, modulates the
reference tokens. Blocks after the first take it on a regular sample of
tokens and channels, with the sampled rows of every block's `img_mod`
stacked into one matmul per model call (base.SampledRows).
"""

from __future__ import annotations

import torch

from .base import (BlockAdapter, BlockGroup, channel_stride, modulate_rows, modulate_rows_by_gain, reference_tokens,
                   sample_of, sampled_tail, token_stride)


class QwenImageAdapter(BlockAdapter):
    family = "qwen_image"
    model_classes = ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",)
    block_groups = (BlockGroup("double_block", "transformer_blocks", ("img", "txt")),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        img = args["img"]
        # img_mod gives 6 chunks: shift, scale, gate for attention, then for the MLP.
        attention_modulation = block.img_mod(args["vec"]).chunk(2, dim=-1)[0]
        shift, scale, _ = attention_modulation.chunk(3, dim=-1)
        # As (batch, rows, dim) views: one row, or the two halves of the doubled batch.
        shift, scale = (t.unflatten(0, (-1, img.shape[0])).transpose(0, 1) for t in (shift, scale))
        self.prepare_sampled_rows(diffusion_model, args["vec"])
        return modulate_rows(block.img_norm1(img), scale, shift, reference_tokens(args))

    def sampled_module_input(self, diffusion_model, kind, index, args):
        img, vec = args["img"], args["vec"]
        tokens_step, channels_step = token_stride(img.shape[1]), channel_stride(img.shape[2])
        stack = self.sampled_rows(diffusion_model, vec, channels_step, chunks=2, gain_from=1, width=img.shape[-1])
        if stack is None:
            return sample_of(self.module_input(diffusion_model, kind, index, args), tokens_step, channels_step)
        block = self.block(diffusion_model, kind, index)
        shift, gain = (t.unflatten(0, (-1, img.shape[0])).transpose(0, 1) for t in stack.rows_for((kind, index), vec))
        normed = block.img_norm1(img[:, ::tokens_step])[..., ::channels_step]
        return modulate_rows_by_gain(normed, gain, shift, sampled_tail(img.shape[1], reference_tokens(args), tokens_step))

    def modulation_linear(self, diffusion_model, kind, index):
        modulation = self.block(diffusion_model, kind, index).img_mod
        return modulation[1] if isinstance(modulation, torch.nn.Sequential) and len(modulation) == 2 else None


ADAPTERS = (QwenImageAdapter(),)
