"""HunyuanVideo (text-to-video, image-to-video, SkyReels) and HunyuanImage 2.1,
which ComfyUI runs with the same diffusion model class.

The blocks are Flux's double- and single-stream blocks, so the module input
is the adaLN-modulated, layer-normalised image stream as for Flux. What
differs is the modulation: with a guiding frame (image-to-video) `vec` is
[B, 2, D] and `modulation_dims` says which token ranges take which of the two
modulations, as the block's own `apply_mod` does.
"""

from __future__ import annotations

import torch

from .base import BlockAdapter, BlockGroup


def modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, modulation_dims) -> torch.Tensor:
    """normed * (1 + scale) + shift, with `modulation_dims` = [(start, end,
    row), ...] choosing the modulation row per token range. Updates `normed`,
    which must be a fresh tensor."""
    if modulation_dims is None:
        return torch.addcmul(shift, normed, 1 + scale)
    # Rows are sliced, not indexed, so they broadcast over the tokens of every
    # sample; ComfyUI's own indexing only broadcasts for a batch of one.
    for start, end, row in modulation_dims:
        normed[:, start:end] *= 1 + scale[:, row:row + 1]
        normed[:, start:end] += shift[:, row:row + 1]
    return normed


class HunyuanVideoAdapter(BlockAdapter):
    family = "hunyuan_video"
    model_classes = ("comfy.ldm.hunyuan_video.model.HunyuanVideo",)
    block_groups = (
        BlockGroup("double_block", "double_blocks", ("img", "txt")),
        BlockGroup("single_block", "single_blocks", ("img",)),
    )

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        if kind == "double_block":
            norm, modulation_layer, modulation_dims = block.img_norm1, block.img_mod, args["modulation_dims_img"]
        else:
            norm, modulation_layer, modulation_dims = block.pre_norm, block.modulation, args["modulation_dims"]
        modulation = modulation_layer(args["vec"])[0]
        return modulate(norm(args["img"]), modulation.scale, modulation.shift, modulation_dims)


ADAPTERS = (HunyuanVideoAdapter(),)
