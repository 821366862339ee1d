"""HunyuanDiT: one stream (img); the patch args carry no transformer_options.

Long skips: the first blocks' outputs are saved and handed, last in first
out, to the second-half blocks as `skip`. Under caching a saved output may be
a predicted one, so the family tests check that what a later block receives
as `skip` is exactly what its partner block returned in that same evaluation,
computed or predicted, and never a cached tensor changed after the fact."""

from __future__ import annotations

from collections import defaultdict

import torch

from family_harness import FORCED, FamilyContract, FamilySpec, rfc, sample_spec
from tiny_models import counted

# depth 6: blocks 0 and 1 save their output; block 4 gets block 1's, block 5 block 0's.
HUNYUAN_DIT_CONFIG = {
    "image_model": "hydit", "input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 6,
    "num_heads": 2, "text_states_dim": 32, "text_states_dim_t5": 32, "text_len": 4, "text_len_t5": 4,
    "learn_sigma": True,
}


def hunyuan_dit_conditioning(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, HUNYUAN_DIT_CONFIG["text_len"], 32, generator=generator)
    t5 = torch.randn(batch, HUNYUAN_DIT_CONFIG["text_len_t5"], 32, generator=generator)
    return [[clip, {"attention_mask": torch.ones(batch, clip.shape[1]),
                    "conditioning_mt5xl": t5, "attention_mask_mt5xl": torch.ones(batch, t5.shape[1])}]]


SPEC = FamilySpec(
    name="hunyuan_dit",
    config_class="HunyuanDiT",
    unet_config=HUNYUAN_DIT_CONFIG,
    latent_shape=(4, 16, 16),
    conditioning=hunyuan_dit_conditioning,
    probe=lambda block, kind: block.attn1.Wqkv,
)


class TestHunyuanDiT(FamilyContract):
    spec = SPEC

    def test_second_half_blocks_get_the_output_their_partner_returned(self, model, nodes):
        """Record, per model evaluation, what each block's patch returned and
        what skip it was given, around the pack's own patches."""
        depth = HUNYUAN_DIT_CONFIG["depth"]
        patched = rfc(nodes, model, **FORCED).clone()
        pack_patches = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        evaluations = defaultdict(dict)
        counter = {"evaluation": -1}

        def recording(index, pack_patch):
            def patch(args, extra):
                if index == 0:
                    counter["evaluation"] += 1
                record = evaluations[counter["evaluation"]]
                if args["skip"] is not None:
                    record[("skip", index)] = args["skip"].clone()
                out = pack_patch(args, extra)
                record[("returned", index)] = out["img"].clone()
                return out
            return patch

        for index in range(depth):
            patched.set_model_patch_replace(recording(index, pack_patches[("double_block", index)]),
                                            "dit", "double_block", index)
        blocks = list(model.model.diffusion_model.blocks)
        latent, executions = counted(blocks, lambda: sample_spec(SPEC, patched, steps=12, cfg=3.0, batch=2))

        assert torch.isfinite(latent).all()
        assert 0 < executions < depth * len(evaluations), "some evaluations must have been predicted"
        second_half = range(depth // 2 + 1, depth)
        for evaluation, record in evaluations.items():
            for index in second_half:
                partner = depth - 1 - index
                assert partner < depth // 2 - 1
                assert torch.equal(record[("skip", index)], record[("returned", partner)]), (evaluation, index)
