"""OmniGen2.

The model has no `patches_replace`, so the main `layers` are reached by
replacing each block's `forward`; the noise, reference-image and context
refiners before them are left alone. The hidden state is the joint sequence
[text | reference images | noisy image].

Module input: what the block's `norm1` (LuminaRMSNormZero) returns first,
the RMS-normalised sequence scaled by the block's own `scale_msa`: its
attention's query projection sees exactly that. It costs one small linear on
the timestep embedding and an RMSNorm.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class OmniGen2Adapter(BlockAdapter):
    family = "omnigen2"
    model_classes = ("comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel",)
    block_groups = (BlockGroup("layer", "layers", ("hidden_states",), hook=FORWARD, outputs=("hidden_states",)),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        modulated, *_ = block.norm1(args["hidden_states"], args["temb"])
        return modulated


ADAPTERS = (OmniGen2Adapter(),)
