"""Cosmos 1 (GeneralDIT) and Cosmos Predict2 (MiniTrainDIT): object-patched blocks.

Cosmos 1 keeps the batch on dim 3 of its [T, H, W, B, D] hidden state and
adds its extra positional embedding, in place, to each block's output before
the next block. The family tests check that a batch keeps its samples apart
under caching, and that the in-place add never reaches the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from family_harness import FORCED, FamilyContract, FamilySpec, rfc
from tiny_models import counted

CONTEXT_TOKENS = 8

COSMOS1_CONFIG = {
    "image_model": "cosmos", "in_channels": 16, "out_channels": 16, "max_img_h": 64, "max_img_w": 64,
    "max_frames": 8, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64, "num_blocks": 2,
    "num_heads": 2, "crossattn_emb_channels": 32, "block_config": "FA-CA-MLP", "concat_padding_mask": True,
    "pos_emb_cls": "rope3d", "pos_emb_learnable": False, "pos_emb_interpolation": "crop",
    "block_x_format": "THWBD", "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 16,
    # GeneralDIT crashes without the extra embedding (it casts it unconditionally).
    "extra_per_block_abs_pos_emb": True, "extra_per_block_abs_pos_emb_type": "learnable",
}

PREDICT2_CONFIG = {
    "image_model": "cosmos_predict2", "in_channels": 16, "out_channels": 16, "max_img_h": 64, "max_img_w": 64,
    "max_frames": 8, "patch_spatial": 2, "patch_temporal": 1, "concat_padding_mask": True, "model_channels": 64,
    "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "use_adaln_lora": True, "adaln_lora_dim": 16,
    "extra_per_block_abs_pos_emb": False, "rope_enable_fps_modulation": False,
}


def cosmos_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, CONTEXT_TOKENS, 32, generator=generator), {}]]


COSMOS1_SPEC = FamilySpec(
    name="cosmos",
    config_class="CosmosT2V",
    unet_config=COSMOS1_CONFIG,
    latent_shape=(16, 4, 8, 8),
    conditioning=cosmos_conditioning,
    # Each block's first sub-layer: it runs only when the block is computed.
    counted_modules=lambda diffusion_model: [block.blocks[0] for block in diffusion_model.blocks.values()],
    # The first sub-layer's own module, which receives the modulated input.
    probe=lambda block, kind: block.blocks[0].block,
)

PREDICT2_SPEC = FamilySpec(
    name="cosmos_predict2",
    config_class="CosmosT2IPredict2",
    unet_config=PREDICT2_CONFIG,
    latent_shape=(16, 4, 8, 8),
    conditioning=cosmos_conditioning,
    counted_modules=lambda diffusion_model: [block.self_attn for block in diffusion_model.blocks],
    probe=lambda block, kind: block.self_attn,
)


class TestCosmos1(FamilyContract):
    spec = COSMOS1_SPEC


class TestCosmosPredict2(FamilyContract):
    spec = PREDICT2_SPEC


class TestCosmosPredict2ExtraPositionEmbedding:
    """No shipped Predict2 model has the per-block position embedding, which
    the block adds before its norm; the module input must add it too."""

    spec = dataclasses.replace(PREDICT2_SPEC, unet_config={**PREDICT2_CONFIG, "extra_per_block_abs_pos_emb": True})
    model = FamilyContract.model
    adapter = FamilyContract.adapter
    assert_sampled_input_close = FamilyContract.assert_sampled_input_close
    test_module_input_is_what_the_block_feeds_its_first_layer = \
        FamilyContract.test_module_input_is_what_the_block_feeds_its_first_layer


def sample_latent(model_patcher, noise, positive, negative, steps=12, cfg=3.0):
    import comfy.sample

    return comfy.sample.sample(model_patcher, noise, steps, cfg, "euler", "simple", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def sample_of(conditioning: list, index: int) -> list:
    cross, extras = conditioning[0]
    return [[cross[index:index + 1], extras]]


def block_executions(model, sample_fn):
    return counted(COSMOS1_SPEC.counted_modules(model.model.diffusion_model), sample_fn)


class TestCosmos1Layout:
    """Cosmos 1 specifics: batch on dim 3, and the in-place add between blocks."""

    spec = COSMOS1_SPEC
    model = FamilyContract.model

    def test_each_sample_of_a_batch_is_cached_as_if_sampled_alone(self, model, nodes):
        """Every estimate is per sample (its gain is taken from that sample's
        own input and output changes), and the compute-or-predict decisions of
        forced caching do not depend on the batch. So each sample of a cached
        batch of two, with its own noise and prompts, must come out as that
        sample cached on its own, up to float rounding; a cache that mixed the
        batch with another dim of [T, H, W, B, D] would not."""
        shape = (2, *COSMOS1_SPEC.latent_shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        positive, negative = cosmos_conditioning(2, 1), cosmos_conditioning(2, 2)
        patched = rfc(nodes, model, **FORCED)

        reference, reference_calls = block_executions(model, lambda: sample_latent(model, noise, positive, negative))
        batched, calls = block_executions(model, lambda: sample_latent(patched, noise, positive, negative))
        assert calls < reference_calls
        for index in range(2):
            alone, alone_calls = block_executions(model, lambda: sample_latent(
                patched, noise[index:index + 1], sample_of(positive, index), sample_of(negative, index)))
            assert alone_calls == calls
            caching_error = (batched[index] - reference[index]).norm()
            batching_error = (batched[index] - alone[0]).norm()
            assert caching_error > 1e-3 * reference[index].norm()
            assert batching_error < 1e-3 * caching_error, index

    @pytest.mark.parametrize("estimator", ["rfe", "reuse"])
    def test_in_place_position_embedding_add_leaves_the_cache_alone(self, model, nodes, estimator):
        """The model adds its extra positional embedding in place to what each
        block returned, predicted or computed. Handing the model a copy of
        every block's output instead must not change the result by a bit."""
        shape = (2, *COSMOS1_SPEC.latent_shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        positive, negative = cosmos_conditioning(2, 1), cosmos_conditioning(2, 2)
        patched = rfc(nodes, model, **FORCED, estimator=estimator)
        blocks = list(model.model.diffusion_model.blocks.values())

        def run():
            return block_executions(model, lambda: sample_latent(patched, noise, positive, negative))

        in_place, in_place_calls = run()
        handles = [block.register_forward_hook(lambda module, inputs, output: output.clone()) for block in blocks]
        try:
            copied, copied_calls = run()
        finally:
            for handle in handles:
                handle.remove()
        assert in_place_calls == copied_calls < len(blocks) * 12  # some blocks were predicted
        assert torch.equal(in_place, copied)
