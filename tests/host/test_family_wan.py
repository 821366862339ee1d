"""Wan 2.1 / 2.2 and the variants on its block: VACE, Camera, S2V, HuMo, Animate.

Latents are three frames of 8x8; with the (1, 2, 2) patch that is 48 image tokens.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, NEVER_SKIPS, FamilyContract, FamilySpec, rfc, sample_spec
from tiny_models import build, counted

FRAMES, HEIGHT, WIDTH = 3, 8, 8
TEXT_WIDTH = 32

TINY_WAN = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
    "in_dim": 16, "out_dim": 16, "text_dim": TEXT_WIDTH, "freq_dim": 256, "patch_size": (1, 2, 2),
    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}


def text(batch, generator):
    return torch.randn(batch, 8, TEXT_WIDTH, generator=generator)


def text_only(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    return [[text(batch, generator), {}]]


def first_frame_kept(batch, seed):
    """Wan 2.2 TI2V keeps the first latent frame (the input image) with a
    denoise mask; WAN22 then gives every latent frame its own timestep."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 1, FRAMES, HEIGHT, WIDTH)
    mask[:, :, 0] = 0.0
    return [[text(batch, generator), {"denoise_mask": mask}]]


def vace_control(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, 32, FRAMES, HEIGHT, WIDTH, generator=generator)
    mask = (torch.rand(batch, 64, FRAMES, HEIGHT, WIDTH, generator=generator) > 0.5).float()
    return [[text(batch, generator), {"vace_frames": [frames], "vace_mask": [mask], "vace_strength": [1.0]}]]


def camera_path(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    # Plücker embedding of each frame's camera, at pixel resolution.
    plucker = torch.randn(batch, 24, FRAMES, HEIGHT * 8, WIDTH * 8, generator=generator)
    return [[text(batch, generator), {"camera_conditions": plucker}]]


def speech(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    # wav2vec features: (batch, encoder layers, feature width, 4 per latent frame)
    audio = torch.randn(batch, 25, 32, FRAMES * 4, generator=generator)
    reference = torch.randn(batch, 16, 1, HEIGHT, WIDTH, generator=generator)
    motion = torch.randn(batch, 16, 4, HEIGHT, WIDTH, generator=generator)
    return [[text(batch, generator), {"audio_embed": audio, "reference_latents": [reference],
                                      "reference_motion": motion}]]


def humo_audio(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    # Whisper features per latent frame: (window 8, 5 layers, 1280), fixed by HuMo's projection.
    audio = torch.randn(batch, FRAMES, 8, 5, 1280, generator=generator)
    reference = torch.randn(batch, 16, 1, HEIGHT, WIDTH, generator=generator)
    return [[text(batch, generator), {"audio_embed": audio, "reference_latents": [reference]}]]


def pose(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    return [[text(batch, generator), {"pose_video_latent": torch.randn(batch, 16, FRAMES - 1, HEIGHT, WIDTH,
                                                                       generator=generator)}]]


def self_attention_query(block, kind):
    return block.self_attn.q


def wan_spec(config_class, latent_channels=16, conditioning=text_only, **unet_config):
    return FamilySpec(name="wan", config_class=config_class, unet_config={**TINY_WAN, **unet_config},
                      latent_shape=(latent_channels, FRAMES, HEIGHT, WIDTH), conditioning=conditioning,
                      probe=self_attention_query)


WAN21_SPEC = wan_spec("WAN21_T2V")
WAN22_SPEC = wan_spec("WAN22_T2V", latent_channels=48, conditioning=first_frame_kept, in_dim=48, out_dim=48)
VACE_SPEC = wan_spec("WAN21_Vace", conditioning=vace_control, model_type="vace", vace_layers=1, vace_in_dim=96)
CAMERA_SPEC = wan_spec("WAN21_Camera", conditioning=camera_path, model_type="camera", in_dim=32)
S2V_SPEC = wan_spec("WAN22_S2V", conditioning=speech, model_type="s2v", audio_dim=32, cond_dim=16,
                    audio_inject_layers=[0, 1])
HUMO_SPEC = wan_spec("WAN21_HuMo", conditioning=humo_audio, model_type="humo")
ANIMATE_SPEC = wan_spec("WAN22_Animate", conditioning=pose, model_type="animate")


def with_block_outputs_copied(patched):
    """`patched` with every block patch's output copied before the model gets
    it: whatever the model then writes in place cannot reach the pack."""
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    for (kind, index), patch in list(replaced.items()):
        def copied(args, extra, patch=patch):
            return {name: value.clone() for name, value in patch(args, extra).items()}

        patched.set_model_patch_replace(copied, "dit", kind, index)
    return patched


class WritesBlockOutputsInPlace:
    """VACE adds its hint with `x += c_skip` and S2V injects audio with
    `x[:, :seq_len] = ...` into what a block patch returned. A predicted
    output sharing memory with the pack's state would be corrupted."""

    def test_in_place_writes_after_a_block_do_not_reach_the_cache(self, model, nodes):
        latent, calls = self.run(model, rfc(nodes, model, **FORCED), cfg=3.0, batch=2)
        isolated, isolated_calls = self.run(model, with_block_outputs_copied(rfc(nodes, model, **FORCED)),
                                            cfg=3.0, batch=2)
        assert calls == isolated_calls
        assert torch.equal(latent, isolated)


class TestWan21(FamilyContract):
    spec = WAN21_SPEC


class TestWan22(FamilyContract):
    spec = WAN22_SPEC

    def test_every_latent_frame_gets_its_own_modulation(self, model):
        modulations = []

        def record(block, args, kwargs):
            modulations.append(tuple(kwargs["e"].shape))

        handle = model.model.diffusion_model.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            sample_spec(self.spec, model, steps=1)
        finally:
            handle.remove()
        assert modulations and all(len(shape) == 4 and shape[1] == FRAMES for shape in modulations), modulations


class TestWanVace(WritesBlockOutputsInPlace, FamilyContract):
    spec = VACE_SPEC


class TestWanCamera(FamilyContract):
    spec = CAMERA_SPEC


class TestWanS2V(WritesBlockOutputsInPlace, FamilyContract):
    spec = S2V_SPEC


class TestWanHuMo(FamilyContract):
    spec = HUMO_SPEC


class TestWanAnimate(FamilyContract):
    spec = ANIMATE_SPEC


STEPS, SWITCH_STEP = 12, 6


def expert_pass(model_patcher, latent, first, last, seed=0, cfg=3.0):
    """One KSamplerAdvanced node: the high-noise expert adds noise and returns
    with leftover noise, the low-noise one adds none and finishes."""
    import comfy.sample

    high_noise = first == 0
    noise = (torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)) if high_noise
             else torch.zeros_like(latent))
    return comfy.sample.sample(model_patcher, noise, STEPS, cfg, "euler", "simple",
                               WAN21_SPEC.conditioning(latent.shape[0], 1), WAN21_SPEC.conditioning(latent.shape[0], 2),
                               latent, disable_noise=not high_noise, start_step=first, last_step=last,
                               force_full_denoise=not high_noise, seed=seed, disable_pbar=True)


class TestWan22TwoExperts:
    """Wan 2.2 A14B: a high-noise and a low-noise expert (both Wan 2.1-shaped
    models) share one sampling schedule, each behind its own RFC Cache node."""

    @pytest.fixture(scope="class")
    def experts(self, comfy):
        return build("WAN21_T2V", WAN21_SPEC.unet_config, seed=1), build("WAN21_T2V", WAN21_SPEC.unet_config, seed=2)

    @staticmethod
    def blocks(model_patcher):
        return list(model_patcher.model.diffusion_model.blocks)

    def two_experts(self, high, low):
        """Both passes in a row; the block executions of each expert."""
        start = torch.zeros(1, *WAN21_SPEC.latent_shape)
        switched, high_calls = counted(self.blocks(high), lambda: expert_pass(high, start, 0, SWITCH_STEP))
        final, low_calls = counted(self.blocks(low), lambda: expert_pass(low, switched, SWITCH_STEP, 10000))
        return switched, final, high_calls, low_calls

    def test_each_expert_caches_as_if_it_ran_alone(self, experts, nodes):
        high, low = experts
        _, _, full_high_calls, full_low_calls = self.two_experts(high, low)
        switched, final, high_calls, low_calls = self.two_experts(rfc(nodes, high, **FORCED), rfc(nodes, low, **FORCED))

        start = torch.zeros(1, *WAN21_SPEC.latent_shape)
        alone_switched, alone_high_calls = counted(
            self.blocks(high), lambda: expert_pass(rfc(nodes, high, **FORCED), start, 0, SWITCH_STEP))
        alone_final, alone_low_calls = counted(
            self.blocks(low), lambda: expert_pass(rfc(nodes, low, **FORCED), switched, SWITCH_STEP, 10000))
        print(f"wan 2.2 two experts: high-noise block executions {high_calls} of {full_high_calls}, "
              f"low-noise {low_calls} of {full_low_calls}")
        assert (high_calls, low_calls) == (alone_high_calls, alone_low_calls)
        assert high_calls < full_high_calls and low_calls < full_low_calls
        assert torch.equal(switched, alone_switched)
        assert torch.equal(final, alone_final)

    @pytest.mark.parametrize("widgets", [{**FORCED, "threshold": 0.0}, NEVER_SKIPS], ids=["threshold0", "never-skips"])
    def test_cache_that_never_skips_leaves_both_experts_bit_identical(self, experts, nodes, widgets):
        high, low = experts
        _, reference, _, _ = self.two_experts(high, low)
        _, final, _, _ = self.two_experts(rfc(nodes, high, **widgets), rfc(nodes, low, **widgets))
        assert torch.equal(final, reference)
