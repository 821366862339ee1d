"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2511 (one class).

Module input: the image stream's adaLN-modulated, layer-normalised input, as
the block computes it for its attention's image query/key/value projections.
Edit reference-latent tokens are appended to the image stream and are part
of it. With `index_timestep_zero` (Edit-2511) the timestep embedding `vec`
has twice the batch: the second half, the embedding at t = 0, modulates the
reference tokens.
"""

from __future__ import annotations

from .base import BlockAdapter, BlockGroup, modulate_rows, reference_tokens


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
        return modulate_rows(block.img_norm1(img), scale, shift, reference_tokens(args))


ADAPTERS = (QwenImageAdapter(),)
