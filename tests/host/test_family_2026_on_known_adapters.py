"""ComfyUI v0.29 to v0.31 model classes that reuse a diffusion model class the
pack already has an adapter for, each run through the contract: LongCat-Image
(Flux), HunyuanVideo 1.5 (HunyuanVideo), Z-Image and Z-Image pixel space
(NextDiT), Anima (Cosmos Predict2's MiniTrainDIT) and the new Wan variants.
The CausalWan `ar_video` sampler keeps its own K/V cache across model
calls; its runs are deliberately not cached, and say so."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from family_harness import FORCED, FamilyContract, FamilySpec, ObjectPatchIsUndone, pack_module, rfc, sample_spec
from test_family_cosmos import PREDICT2_SPEC
from test_family_hunyuan_video import HUNYUAN_VIDEO, flux_block_probe
from test_family_lumina2 import SPEC as LUMINA2_SPEC
from test_family_wan import WAN21_SPEC
from tiny_models import build, counted


def text(batch: int, seed: int, tokens: int = 8, width: int = 32, **extras) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, width, generator=generator), extras]]


LONGCAT_IMAGE = FamilySpec(
    name="flux", config_class="LongCatImage",
    unet_config={"image_model": "flux", "guidance_embed": False, "vec_in_dim": None, "context_in_dim": 32,
                 "txt_ids_dims": [1, 2], "in_channels": 16, "out_channels": 16, "hidden_size": 64, "mlp_ratio": 4.0,
                 "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
                 "patch_size": 2, "qkv_bias": True},
    latent_shape=(16, 8, 8), conditioning=text, probe=flux_block_probe,
)

# HunyuanVideo 1.5 concatenates a zero image and a mask to the latent (65
# input channels) and needs a `pooled_output` entry, which may be None. Its
# attention mask breaks cond and uncond batched together (in ComfyUI), so
# none is given.
HUNYUAN_VIDEO_15 = dataclasses.replace(
    HUNYUAN_VIDEO, config_class="HunyuanVideo15",
    unet_config={**HUNYUAN_VIDEO.unet_config, "in_channels": 65, "out_channels": 32, "vec_in_dim": None,
                 "guidance_embed": False, "use_cond_type_embedding": False},
    latent_shape=(32, 2, 8, 8),
    conditioning=lambda batch, seed: text(batch, seed, pooled_output=None),
)

Z_IMAGE_CONFIG = {
    # NextDiT's Z-Image modulation takes the 256-wide timestep embedding: dim is at least 256.
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2, "n_refiner_layers": 1,
    "n_heads": 4, "n_kv_heads": 4, "multiple_of": 16, "ffn_dim_multiplier": 8.0 / 3.0, "qk_norm": True,
    "cap_feat_dim": 32, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
Z_IMAGE = dataclasses.replace(LUMINA2_SPEC, config_class="ZImage", unet_config=Z_IMAGE_CONFIG,
                              latent_shape=(16, 8, 8), conditioning=text)
# Pixel space: RGB patches of 16 decoded by a small pixel decoder after the layers.
Z_IMAGE_PIXEL_SPACE = dataclasses.replace(
    Z_IMAGE, config_class="ZImagePixelSpace", latent_shape=(3, 64, 64),
    unet_config={**Z_IMAGE_CONFIG, "image_model": "zimage_pixel", "in_channels": 3, "patch_size": 16,
                 "decoder_hidden_size": 32, "decoder_num_res_blocks": 1, "decoder_in_channels": 768})

ANIMA = dataclasses.replace(
    PREDICT2_SPEC, config_class="Anima",
    # Without T5 ids Anima's LLM adapter is bypassed and the context goes to the blocks as it is.
    unet_config={**PREDICT2_SPEC.unet_config, "crossattn_emb_channels": 1024},
    latent_shape=(16, 1, 8, 8), conditioning=lambda batch, seed: text(batch, seed, width=1024),
)

WAN_VARIANTS = {
    "flow_rvs": dataclasses.replace(WAN21_SPEC, config_class="WAN21_FlowRVS"),
    "scail": dataclasses.replace(WAN21_SPEC, config_class="WAN21_SCAIL",
                                 unet_config={**WAN21_SPEC.unet_config, "in_dim": 20}),
    "scail2": dataclasses.replace(WAN21_SPEC, config_class="WAN21_SCAIL2",
                                  unet_config={**WAN21_SPEC.unet_config, "in_dim": 20}),
    "wandancer": dataclasses.replace(WAN21_SPEC, config_class="WAN22_WanDancer",
                                     unet_config={**WAN21_SPEC.unet_config, "in_dim": 36}),
    # Animate 2 runs its blocks through `forward_gen`, not `__call__`, so the
    # count is of the feed-forward each real execution runs once (without
    # pose latents there is no pose branch to share it).
    "animate2": dataclasses.replace(WAN21_SPEC, config_class="WAN_Animate2",
                                    unet_config={**WAN21_SPEC.unet_config, "in_dim": 36},
                                    counted_modules=lambda dm: [block.ffn for block in dm.blocks]),
    "causal_ar": dataclasses.replace(WAN21_SPEC, config_class="WAN21_CausalAR_T2V"),
}


class TestLongCatImage(FamilyContract):
    spec = LONGCAT_IMAGE


class TestHunyuanVideo15(FamilyContract):
    spec = HUNYUAN_VIDEO_15


class TestZImage(FamilyContract, ObjectPatchIsUndone):
    spec = Z_IMAGE

    def test_sampled_module_inputs_come_from_the_stacked_modulation_rows(self, model, nodes, monkeypatch):
        """Z-Image's adaLN is a linear with no SiLU in front: the blocks after
        the first still take their sampled module input from the stacked
        rows (one matmul per model call), not from each block's full
        modulation; the contract test checks the values."""
        base = pack_module(nodes, "nodes.adapters.base")
        monkeypatch.setattr(base, "MODULE_INPUT_TOKENS", 4)
        monkeypatch.setattr(base, "MODULE_INPUT_CHANNELS", 8)
        built, prepared = [], []
        init, prepare = base.SampledRows.__init__, base.SampledRows.prepare

        def spy_init(stack, *args, **kwargs):
            init(stack, *args, **kwargs)
            built.append(stack.activate)

        def spy_prepare(stack, conditioning):
            prepared.append(conditioning)
            return prepare(stack, conditioning)

        monkeypatch.setattr(base.SampledRows, "__init__", spy_init)
        monkeypatch.setattr(base.SampledRows, "prepare", spy_prepare)
        sample_spec(self.spec, rfc(nodes, model, **FORCED), steps=4)
        assert built == [False]  # one stack for the run, applied without SiLU
        assert prepared


class TestZImagePixelSpace(FamilyContract, ObjectPatchIsUndone):
    spec = Z_IMAGE_PIXEL_SPACE


class TestAnima(FamilyContract):
    spec = ANIMA


class TestWanFlowRVS(FamilyContract):
    spec = WAN_VARIANTS["flow_rvs"]


class TestWanSCAIL(FamilyContract):
    spec = WAN_VARIANTS["scail"]


class TestWanSCAIL2(FamilyContract):
    spec = WAN_VARIANTS["scail2"]


class TestWanDancer(FamilyContract):
    spec = WAN_VARIANTS["wandancer"]


class TestWanAnimate2(FamilyContract):
    spec = WAN_VARIANTS["animate2"]


class TestCausalWanWithStepSamplers(FamilyContract):
    """Outside `ar_video` CausalWan is a WanModel and is cached block by block."""
    spec = WAN_VARIANTS["causal_ar"]


def sample_ar_video(model_patcher, steps: int = 4):
    import comfy.sample
    import comfy.samplers

    spec = WAN_VARIANTS["causal_ar"]
    shape = (1, *spec.latent_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": 1})
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return comfy.sample.sample_custom(model_patcher, noise, 1.0, sampler, sigmas, spec.conditioning(1, 1),
                                      spec.conditioning(1, 2), torch.zeros(shape), seed=0, disable_pbar=True)


@pytest.mark.parametrize("granularity", ["auto", "model"])
def test_ar_video_runs_are_not_cached_and_say_why(comfy, nodes, caplog, granularity):
    """The sampler rewinds its own K/V cache after every step; a predicted
    call would corrupt it. The run is computed in full, bit for bit what the
    plain model gives, the log says why and the summary counts every call."""
    import comfy.samplers

    if "ar_video" not in comfy.samplers.KSAMPLER_NAMES and not hasattr(
            __import__("comfy.k_diffusion.sampling", fromlist=["x"]), "sample_ar_video"):
        pytest.skip("no ar_video sampler in this ComfyUI")
    spec = WAN_VARIANTS["causal_ar"]
    model = build(spec.config_class, spec.unet_config)
    blocks = list(model.model.diffusion_model.blocks)
    reference, reference_calls = counted(blocks, lambda: sample_ar_video(model))
    caplog.set_level(logging.INFO, logger="ComfyUI-RFC")
    latent, calls = counted(blocks, lambda: sample_ar_video(rfc(nodes, model, granularity=granularity, **FORCED)))
    assert torch.equal(latent, reference)
    assert calls == reference_calls
    assert "not cached, because the ar_video sampler keeps its own K/V cache" in caplog.text
    frames, steps = spec.latent_shape[1], 4
    # Per latent frame: one call per step and one at sigma 0 that commits the frame's K/V.
    evaluations = frames * (steps + 1)
    assert f"computed {evaluations} of {evaluations} model evaluations" in caplog.text
