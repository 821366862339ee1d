"""HiDream-I1 (and E1, which shares its class).

HiDream has no `patches_replace`, so the blocks' `forward` is object-patched.
Each block is a `HiDreamImageBlock` wrapping the real block in `.block`.

The double blocks get a different text stream each: the model appends a
different llama layer to the running text before every block and cuts the
returned text back to the running part afterwards. Caching the text
residual per block is still sound: the cache is keyed by block, a block's
appended llama layer is the same at every step, and the prediction is added
to the text that block receives on that step, so the cut keeps working on it.

Module input: the image stream as the block feeds its attention, normalised
and adaLN-modulated (one small linear on the timestep and pooled embedding).
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup

# adaLN chunks per block: the double block modulates image and text
# (6 each), the single block only the joint image stream.
_MODULATION_CHUNKS = {"double_block": 12, "single_block": 6}


class HiDreamAdapter(BlockAdapter):
    family = "hidream"
    model_classes = ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",)
    block_groups = (
        BlockGroup("double_block", "double_stream_blocks", ("image_tokens", "text_tokens"), hook=FORWARD),
        BlockGroup("single_block", "single_stream_blocks", ("image_tokens",), hook=FORWARD),
    )

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index).block
        image_tokens = args["image_tokens"]
        shift, scale = block.adaLN_modulation(args["adaln_input"])[:, None].chunk(_MODULATION_CHUNKS[kind], dim=-1)[:2]
        normed = block.norm1_i(image_tokens).to(dtype=image_tokens.dtype)
        return normed * (1 + scale) + shift


ADAPTERS = (HiDreamAdapter(),)
