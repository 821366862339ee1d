"""Krea 2 (`SingleStreamDiT`).

The model has no `patches_replace`, so each of its `blocks` is reached by
replacing the block's `forward`. The text-fusion blocks that run before them
see the caption only and are left alone.

Module input: what the block feeds its attention's projections, the
RMS-normalised joint [text, image] sequence scaled by `1 + prescale` and
shifted by `preshift`. The block's shared modulation yields scale before
shift (prescale, preshift, pregate, ...), the reverse of Flux. With
`index_timestep_zero` references the timestep vector has twice the batch:
its second half, at t = 0, modulates the tokens from `timestep_zero_index`
on (the reference images), the first half every token before it.
"""

from __future__ import annotations

import torch

from .base import FORWARD, BlockAdapter, BlockGroup


class Krea2Adapter(BlockAdapter):
    family = "krea2"
    model_classes = ("comfy.ldm.krea2.model.SingleStreamDiT",)
    block_groups = (BlockGroup("block", "blocks", ("x",), hook=FORWARD),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["x"]
        prescale, preshift = block.mod(args["vec"])[:2]
        normed = block.prenorm(x)
        reference_start = args.get("timestep_zero_index")
        if reference_start is None:
            return (1 + prescale) * normed + preshift
        batch = x.shape[0]
        return torch.cat(((1 + prescale[:batch]) * normed[:, :reference_start] + preshift[:batch],
                          (1 + prescale[batch:]) * normed[:, reference_start:] + preshift[batch:]), dim=1)


ADAPTERS = (Krea2Adapter(),)
