"""HunyuanVideo and HunyuanImage 2.1 (one diffusion model class, two configs).

Their blocks update inputs in place (the double block `txt += ...`, the single
block `x += ...`), so besides the contract this checks that forced caching
gives the same latent when every block works on copies of its inputs. The
check is shared with the other in-place families through `InPlaceContract`.
"""

from __future__ import annotations

import dataclasses

import torch

from family_harness import FORCED, FamilyContract, FamilySpec, InPlaceContract, pack_module, rfc, sample_spec
from tiny_models import counted


def text_conditioning(pooled: int | None, **extras):
    def conditioning(batch, seed):
        generator = torch.Generator().manual_seed(seed)
        cross = torch.randn(batch, 8, 32, generator=generator)
        values = dict(extras)
        if pooled is not None:
            values["pooled_output"] = torch.randn(batch, pooled, generator=generator)
        return [[cross, values]]

    return conditioning


def flux_block_probe(block, kind):
    return block.img_attn.qkv if kind == "double_block" else block.linear1


HUNYUAN_VIDEO = FamilySpec(
    name="hunyuan_video",
    config_class="HunyuanVideo",
    unet_config={
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
        "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
    },
    latent_shape=(16, 4, 8, 8),
    conditioning=text_conditioning(pooled=32, guidance=6.0),
    probe=flux_block_probe,
)

HUNYUAN_IMAGE_21 = FamilySpec(
    name="hunyuan_video",
    config_class="HunyuanImage21",
    unet_config={
        "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 2, "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1],
        "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
    },
    latent_shape=(64, 8, 8),
    conditioning=text_conditioning(pooled=None),
    probe=flux_block_probe,
)


class TestHunyuanVideo(FamilyContract, InPlaceContract):
    spec = HUNYUAN_VIDEO

    def test_guiding_frame_modulation(self, model, nodes, monkeypatch):
        """Image-to-video guiding frames: `vec` is [B, 2, D] and the first
        frame's tokens take the other modulation. ComfyUI's own modulation
        only broadcasts for a batch of one, so the probe runs with one sample;
        forced caching must still skip blocks and stay finite."""
        guided = dataclasses.replace(
            HUNYUAN_VIDEO, conditioning=text_conditioning(pooled=32, guidance=6.0, guiding_frame_index=0))
        adapter = self.adapter(model)
        diffusion_model = model.model.diffusion_model
        from_adapter, from_block = {}, {}
        original = type(adapter).module_input

        def spy(self_, diffusion_model_, kind, index, args):
            value = original(self_, diffusion_model_, kind, index, args)
            assert args["vec"].ndim == 3 and args["vec"].shape[1] == 2
            from_adapter.setdefault((kind, index), value.clone())
            return value

        monkeypatch.setattr(type(adapter), "module_input", spy)
        handles = []
        for kind, index in adapter.block_keys(diffusion_model):
            probe = flux_block_probe(adapter.block(diffusion_model, kind, index), kind)
            handles.append(probe.register_forward_pre_hook(
                lambda module, inputs, key=(kind, index): from_block.setdefault(key, inputs[0].clone())))
        blocks = self.all_blocks(model)
        try:
            latent, calls = counted(blocks, lambda: sample_spec(guided, rfc(nodes, model, **FORCED), cfg=1.0, batch=1))
        finally:
            for handle in handles:
                handle.remove()
        assert calls < len(blocks) * guided.steps
        assert set(from_adapter) == set(from_block) == set(adapter.block_keys(diffusion_model))
        for key in from_block:
            torch.testing.assert_close(from_adapter[key], from_block[key], rtol=1e-4, atol=1e-5, msg=str(key))
        assert torch.isfinite(latent).all()


class TestHunyuanImage21(FamilyContract, InPlaceContract):
    spec = HUNYUAN_IMAGE_21


def test_guided_modulation_broadcasts_over_a_batch(comfy):
    """With several samples the adapter's modulation gives each sample its own
    rows: what ComfyUI's apply_mod computes for each sample alone."""
    import nodes
    from comfy.ldm.flux.layers import apply_mod

    modulate = pack_module(nodes, "nodes.adapters.hunyuan_video").modulate
    generator = torch.Generator().manual_seed(0)
    normed = torch.randn(3, 10, 8, generator=generator)
    scale, shift = torch.randn(3, 2, 8, generator=generator), torch.randn(3, 2, 8, generator=generator)
    dims = [(0, 4, 0), (4, None, 1)]
    together = modulate(normed.clone(), scale, shift, dims)
    for sample in range(3):
        alone = apply_mod(normed[sample:sample + 1].clone(), 1 + scale[sample:sample + 1],
                          shift[sample:sample + 1], dims)
        torch.testing.assert_close(together[sample:sample + 1], alone)
