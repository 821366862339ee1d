"""NVIDIA Cosmos 1 (GeneralDIT) and Cosmos Predict2 (MiniTrainDIT).

Neither has `patches_replace`, so the blocks' `forward` is object-patched.

Cosmos 1 keeps its hidden state as [T, H, W, B, D], batch on dim 3, and
adds its extra positional embedding to the previous block's output in place
before every block. The runtime packs every stream into a new tensor, so
that add never reaches a cached feature.

Module input, for both: the hidden state as the block's first sub-layer
(self-attention in every shipped config) receives it, layer-normalised and
adaLN-modulated; one small (LoRA-factored) linear on the timestep embedding.
"""

from __future__ import annotations

from .base import FORWARD, BlockAdapter, BlockGroup


class Cosmos1Adapter(BlockAdapter):
    family = "cosmos"
    model_classes = ("comfy.ldm.cosmos.model.GeneralDIT",)
    block_groups = (BlockGroup("block", "blocks", ("x",), hook=FORWARD, batch_dim=3),)

    def module_input(self, diffusion_model, kind, index, args):
        # The first sub-layer's input is the block's own input; a later
        # sub-layer's would need the ones before it computed.
        first_layer = self.block(diffusion_model, kind, index).blocks[0]
        modulation = first_layer.adaLN_modulation(args["emb_B_D"])
        if first_layer.use_adaln_lora:
            modulation = modulation + args["adaln_lora_B_3D"]
        shift, scale, _ = modulation.chunk(first_layer.n_adaln_chunks, dim=1)
        # [B, D] broadcast over [T, H, W, B, D]
        return first_layer.norm_state(args["x"]) * (1 + scale[None, None, None]) + shift[None, None, None]


class CosmosPredict2Adapter(BlockAdapter):
    family = "cosmos_predict2"
    model_classes = ("comfy.ldm.cosmos.predict2.MiniTrainDIT",)
    block_groups = (BlockGroup("block", "blocks", ("x_B_T_H_W_D",), hook=FORWARD),)

    def module_input(self, diffusion_model, kind, index, args):
        block = self.block(diffusion_model, kind, index)
        x = args["x_B_T_H_W_D"]
        if args["extra_per_block_pos_emb"] is not None:
            x = x + args["extra_per_block_pos_emb"]
        modulation = block.adaln_modulation_self_attn(args["emb_B_T_D"])
        if block.use_adaln_lora:
            modulation = modulation + args["adaln_lora_B_T_3D"]
        shift, scale, _ = modulation.chunk(3, dim=-1)
        # [B, T or 1, D] broadcast over [B, T, H, W, D]
        modulated = block.layer_norm_self_attn(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        # The tokens flattened, as the self-attention receives them.
        return modulated.flatten(1, 3)


ADAPTERS = (Cosmos1Adapter(), CosmosPredict2Adapter())
