"""Qwen-Image 2.1 (`QwenImage21Transformer2DModel`, ComfyUI v0.37 and later).

One joint stream per block: the text and reference-image rows (the prefix,
modulated at t = 0) first, the target image rows last. The model keeps the
prefix rows' K/V across the steps of a run itself: the first step computes
the prefix rows once, block by block, and stores their K/V; every later step
runs the target rows only against that cache. It switches that cache off as
soon as any `patches_replace["dit"]` entry exists, so RFC does not use the
model's `single_block` patch point (which would cost the user the cache)
but object-patches each block's `forward`, which the model does not see.

Two kinds of call reach a block then:
- the first step's prefix call, prefix rows only, which fills the model's
  K/V cache: always computed, never cached (uncached_call);
- the target call (every step; the whole sequence where the model's cache
  is off): cached.
The block updates its input in place; the runtime keeps a copy first.

Module input: what the block feeds its attention on the target rows, the
layer norm scaled by the shared modulation's first target scale (no shift).
The prefix rows are left out: at the first block they are the same every
step, and with the model's cache on they are not in the call at all.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class QwenImage21Adapter(BlockAdapter):
    family = "qwen_image21"
    model_classes = ("comfy.ldm.qwen_image21.model.QwenImage21Transformer2DModel",)
    block_groups = (BlockGroup("single_block", "transformer_blocks", ("x",), hook=FORWARD),)

    def uncached_call(self, kind, args) -> bool:
        prefix_len = args.get("prefix_len") or 0
        return 0 < prefix_len == args["x"].shape[1]

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x, prefix_len = args["x"], args.get("prefix_len") or 0
        _, target_scale = args["mod"][0]
        target = x[:, prefix_len:] if prefix_len else x
        return block.img_norm1(target) * (1 + target_scale)


ADAPTERS = (QwenImage21Adapter(),)
