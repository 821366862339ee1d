"""MiniMax H3 (`MiniMaxH3Model`, ComfyUI v0.31 and later) at block level.

Its blocks see one packed sequence of rows without a batch dimension: text,
conditioning rows (keyframes, references), then the target audio and video,
each segment modulated with its own timestep's row. The model takes batch 1
only and never batches cond with uncond, so every run here is at batch 1
(cfg 3 runs cond and uncond as two chunks). The video, the audio and the
prefix of text and conditioning rows are cached as three modules per block.

The family does not exist before v0.31; `tiny_models.build` skips there.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import (FORCED, NEVER_SKIPS, FamilyContract, FamilySpec, InPlaceContract,  # noqa: F401
                            caching_never_fails, forced_full_evaluations, nested_latent, pack_module, rfc, sample_spec)
from tiny_models import counted

# A fault would fall back to whole model calls: every test here fails on one.
pytestmark = pytest.mark.usefixtures("caching_never_fails")

CONFIG = {"image_model": "minimax_h3", "hidden_size": 64, "num_layers": 2, "token_refiner_num_layers": 1,
          "num_attention_heads": 2, "attention_head_dim": 32, "ffn_hidden_size": 128, "latents_dim": 24,
          "audio_latents_dim": 32, "text_dim": 32, "timestep_input_dim": 256, "time_embed_hidden_size": 64,
          "time_embed_dim": 32, "rope_inv_freq_len": 4}
TEXT_TOKENS = 8
# 2 latent frames of 4x4 (2x2 patches: 4 rows a frame), and 10 stereo audio latents (20 rows).
VIDEO, AUDIO = (24, 2, 4, 4), (32, 2, 10)


def video_rows(video) -> int:
    return video[1] * (video[2] // 2) * (video[3] // 2)


def audio_rows(audio) -> int:
    return audio[1] * audio[2]


def fill_inv_freq(diffusion_model) -> None:
    """Standard RoPE values for the `inv_freq` buffer a checkpoint supplies
    (left empty, it gives NaN)."""
    with torch.no_grad():
        for name, buffer in diffusion_model.named_buffers():
            if name.endswith("inv_freq") and buffer.ndim == 1:
                half = buffer.shape[0]
                buffer.copy_(1.0 / (10000 ** (torch.arange(0, 2 * half, 2).float() / (2 * half))))


def fill_curve_table(diffusion_model) -> None:
    """fill_inv_freq, and the time-embedding curve table of a curve-form
    checkpoint (`adaln_curve_grid`: no time embedder, the modulation linears
    take interpolated rows of this table, without SiLU, in float32)."""
    fill_inv_freq(diffusion_model)
    with torch.no_grad():
        table = diffusion_model.adaln_t_table
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3)))


def text(**extras):
    """Seeded text conditioning with `extras` (callables get the generator)."""
    def make(batch: int, seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        cross = torch.randn(batch, TEXT_TOKENS, 32, generator=generator)
        values = {key: value(generator) if callable(value) else value for key, value in extras.items()}
        return [[cross, values]]
    return make


def stream_rows(video, audio):
    """FamilySpec.probe_input: the rows a stream's module input covers in
    what the block feeds its qkv linear (all packed rows), with a batch dim
    as the module input has: the video's and the prefix's own rows, and for
    the audio the audio and video rows."""
    def probe_input(fed, key):
        video_start = fed.shape[0] - video_rows(video)
        audio_start = video_start - audio_rows(audio)
        spans = {"prefix": (0, audio_start), "audio": (audio_start, fed.shape[0]), "video": (video_start, fed.shape[0])}
        start, stop = spans[key[2]]
        return fed[start:stop].unsqueeze(0)
    return probe_input


def spec(video=VIDEO, audio=AUDIO, conditioning=None, config=CONFIG, prepare=fill_inv_freq) -> FamilySpec:
    return FamilySpec(
        name="minimax_h3", config_class="MiniMaxH3", unet_config=config, latent_shape=video,
        latent=nested_latent(video, audio), conditioning=conditioning or text(),
        probe=lambda block, kind: {stream: block.attn.qkv_proj for stream in ("video", "audio", "prefix")},
        probe_input=stream_rows(video, audio), prepare=prepare,
        empty_streams=("audio",) if audio_rows(audio) == 0 else (),
    )


def keyframe(generator):
    """A first-frame keyframe: one encoded frame at the target's size, 4 conditioning rows."""
    return [{"resolved_frame_index": 0, "latent": torch.randn(1, 24, 1, 4, 4, generator=generator)}]


def references(generator):
    """ref2va references: an image, a standalone audio clip, and a video with its soundtrack."""
    return [
        {"kind": "image", "latent_h": 4, "latent_w": 4, "latent": torch.randn(1, 24, 1, 4, 4, generator=generator)},
        {"kind": "audio", "ref_audio_t": 3, "audio_latent": torch.randn(1, 32, 2, 3, generator=generator)},
        {"kind": "video_audio", "latent_t": 2, "latent_h": 4, "latent_w": 4, "ref_audio_t": 3,
         "latent": torch.randn(1, 24, 2, 4, 4, generator=generator),
         "audio_latent": torch.randn(1, 32, 2, 3, generator=generator)},
    ]


MINIMAX_H3 = spec()
# Runs the tiny model can have beside text to video with sound. A zero-length
# audio latent is a video-only run (its audio segment is empty); one latent
# frame is the text-to-image template's run, mostly audio rows here.
VARIANTS = {
    "video_only": spec(audio=(32, 2, 0)),
    "one_frame": spec(video=(24, 1, 4, 4), audio=(32, 2, 16)),
    "keyframe": spec(conditioning=text(minimax_keyframes=keyframe, minimax_frame_count=9)),
    "references": spec(conditioning=text(minimax_refs=references)),
    # Vision pads in the prompt carry the video modality: the text splits into tag runs.
    "token_tags": spec(conditioning=text(minimax_token_tags=torch.tensor([[1, 1, 0, 0, 1, 2, 2, 1]]))),
    # Checkpoints shipped over a time-embedding curve (ComfyUI's `adaln_curve_grid`).
    "curve_adaln": spec(config={**CONFIG, "adaln_curve_grid": 16}, prepare=fill_curve_table),
}


class TestMiniMaxH3(FamilyContract, InPlaceContract):
    spec = MINIMAX_H3

    @pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 1)])
    def test_cache_that_never_skips_is_bit_identical(self, model, nodes, cfg, batch):
        super().test_cache_that_never_skips_is_bit_identical(model, nodes, cfg, batch)

    def test_threshold_zero_is_bit_identical(self, model, nodes):
        reference, _ = self.run(model, model, cfg=3.0, batch=1)
        latent, _ = self.run(model, rfc(nodes, model, **{**FORCED, "threshold": 0.0}), cfg=3.0, batch=1)
        assert torch.equal(latent, reference)

    @pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 1)])
    def test_forced_caching_cuts_block_executions_to_about_a_third(self, model, nodes, cfg, batch):
        super().test_forced_caching_cuts_block_executions_to_about_a_third(model, nodes, cfg, batch)

    def test_forced_caching_matches_a_run_on_copied_block_inputs(self, model, nodes):
        # as InPlaceContract's, at batch 1
        from family_harness import _InputCopies

        _, reference_calls = self.run(model, model, cfg=3.0)
        latent, calls = self.run(model, rfc(nodes, model, **FORCED), cfg=3.0)
        with _InputCopies(self.all_blocks(model)):
            on_copies, calls_on_copies = self.run(model, rfc(nodes, model, **FORCED), cfg=3.0)
        assert calls == calls_on_copies < reference_calls
        assert torch.equal(latent, on_copies)

    def test_each_block_caches_video_audio_and_prefix_apart(self, model):
        diffusion_model = model.model.diffusion_model
        keys = self.adapter(model).module_keys(diffusion_model)
        assert keys[0] == ("double_block", 0, "video"), "the first block's video takes each evaluation's decision"
        assert keys == [("double_block", i, stream) for i in range(CONFIG["num_layers"])
                        for stream in ("video", "audio", "prefix")]

    def test_both_streams_are_predicted_and_keep_their_own_scales(self, model, nodes):
        """Forced caching moves the video and the audio off the uncached run
        (both are predicted) and each stays finite. Each stream's module
        input is modulated at its own timestep: from the first evaluation to
        the second the audio rows change by another factor than the video
        rows (the audio runs on its own shifted schedule). The video's covers
        its own rows, the audio's the audio and video rows, the prefix's the
        text rows."""
        reference, _ = self.run(model, model, steps=30)
        latent, _ = self.run(model, rfc(nodes, model, **FORCED), steps=30)
        video = torch.Size(VIDEO).numel()
        for ours, theirs in ((latent[:, :video], reference[:, :video]), (latent[:, video:], reference[:, video:])):
            assert torch.isfinite(ours).all()
            assert not torch.equal(ours, theirs)

        adapter = self.adapter(model)
        inputs = {"video": [], "audio": [], "prefix": []}
        full_input = type(adapter).module_input

        def spy(self_, diffusion_model, kind, index, args, stream="video"):
            for name in inputs:
                inputs[name].append(full_input(self_, diffusion_model, kind, index, args, stream=name))
            return full_input(self_, diffusion_model, kind, index, args, stream=stream)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(adapter), "module_input", spy)
            sample_spec(self.spec, rfc(nodes, model, **NEVER_SKIPS), steps=4)
        rows = {"video": video_rows(VIDEO), "audio": audio_rows(AUDIO) + video_rows(VIDEO), "prefix": TEXT_TOKENS}
        assert {name: values[0].shape for name, values in inputs.items()} == {
            name: (1, count, CONFIG["hidden_size"]) for name, count in rows.items()}
        own_rows = {"video": inputs["video"], "audio": [value[:, :audio_rows(AUDIO)] for value in inputs["audio"]]}
        changes = {name: ((values[2] - values[1]).norm() / (values[1] - values[0]).norm()).item()
                   for name, values in own_rows.items()}
        assert abs(changes["video"] - changes["audio"]) > 0.05 * changes["video"], changes


class _Variant(FamilyContract):
    """The contract on another layout of the packed rows, at batch 1."""

    @pytest.mark.parametrize("cfg,batch", [(3.0, 1)])
    def test_cache_that_never_skips_is_bit_identical(self, model, nodes, cfg, batch):
        super().test_cache_that_never_skips_is_bit_identical(model, nodes, cfg, batch)

    def test_threshold_zero_is_bit_identical(self, model, nodes):
        reference, _ = self.run(model, model, cfg=3.0, batch=1)
        latent, _ = self.run(model, rfc(nodes, model, **{**FORCED, "threshold": 0.0}), cfg=3.0, batch=1)
        assert torch.equal(latent, reference)

    @pytest.mark.parametrize("cfg,batch", [(3.0, 1)])
    def test_forced_caching_cuts_block_executions_to_about_a_third(self, model, nodes, cfg, batch):
        super().test_forced_caching_cuts_block_executions_to_about_a_third(model, nodes, cfg, batch)


class TestVideoOnly(_Variant):
    spec = VARIANTS["video_only"]

    def test_the_empty_audio_stream_is_passed_through(self, model, nodes):
        """Never cached and no module input built for it: the video and the prefix are."""
        seen = []
        adapter = self.adapter(model)
        modulated = type(adapter)._modulated

        def spy(self_, block, args, stream, *rest, **kwargs):
            seen.append(stream)
            return modulated(self_, block, args, stream, *rest, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(adapter), "_modulated", spy)
            latent, calls = self.run(model, rfc(nodes, model, **FORCED), steps=12)
        assert set(seen) == {"video", "prefix"}
        assert torch.isfinite(latent).all()
        assert calls == 2 * forced_full_evaluations(12)


class TestOneLatentFrame(_Variant):
    spec = VARIANTS["one_frame"]


class TestKeyframe(_Variant):
    spec = VARIANTS["keyframe"]


class TestReferences(_Variant):
    spec = VARIANTS["references"]


class TestTokenTags(_Variant):
    spec = VARIANTS["token_tags"]


class TestCurveAdaln(_Variant):
    spec = VARIANTS["curve_adaln"]

    def test_the_modulation_takes_the_curve_without_silu(self, model):
        block = model.model.diffusion_model.blocks[0]
        assert block.adaln_proj.apply_silu is False
        assert block.adaln_proj.linear.weight.dtype == torch.float32


def test_audio_only_is_no_run_of_this_model(comfy):
    """A video latent of no frames fails in the model itself, cached or not:
    there is no audio-only run to cache."""
    from tiny_models import build

    model = build("MiniMaxH3", CONFIG)
    fill_inv_freq(model.model.diffusion_model)
    with pytest.raises(RuntimeError):
        sample_spec(spec(video=(24, 0, 4, 4)), model, steps=2)


def test_whole_model_granularity_still_caches_both_latents(comfy, nodes):
    """granularity model: the packed latent of both streams is the one
    cached module; forced caching runs the blocks on 10 of 30 evaluations."""
    from tiny_models import build

    model = build("MiniMaxH3", CONFIG)
    fill_inv_freq(model.model.diffusion_model)
    blocks = list(model.model.diffusion_model.blocks)
    steps = 30
    reference, reference_calls = counted(blocks, lambda: sample_spec(MINIMAX_H3, model, steps=steps))
    patched = rfc(nodes, model, granularity="model", **FORCED)
    settings = patched.model_options["transformer_options"][pack_module(nodes, "nodes.runtime").SETTINGS_KEY]
    assert settings.granularity == "model"
    latent, calls = counted(blocks, lambda: sample_spec(MINIMAX_H3, patched, steps=steps))
    assert calls == reference_calls // steps * forced_full_evaluations(steps)
    assert latent.shape == reference.shape
    assert torch.isfinite(latent).all()
