"""LTX-2 (`LTXAVModel`): one transformer for video and audio. Its blocks
take and return `(video, audio)` as one tuple, update both in place, and
get video timesteps in ComfyUI's per-frame compressed form. Each stream is
cached as its own module with its own module input; the latent is ComfyUI's
NestedTensor of both."""

from __future__ import annotations

import torch

from family_harness import FORCED, FamilyContract, FamilySpec, InPlaceContract, nested_latent, rfc, sample_spec
from tiny_models import counted

LTX2_CONFIG = {
    "image_model": "ltxav", "num_layers": 2, "in_channels": 128, "audio_in_channels": 128,
    "num_attention_heads": 2, "attention_head_dim": 32, "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 32, "cross_attention_dim": 64, "audio_cross_attention_dim": 64,
    "caption_channels": 32, "connector_num_attention_heads": 2, "connector_attention_head_dim": 16,
    "connector_num_layers": 1,
}
# 9 frames at 64x64: 2 latent frames of 2x2, and 9 audio latents of 16 bins.
VIDEO_SHAPE, AUDIO_SHAPE = (128, 2, 2, 2), (8, 9, 16)




def text(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 8, 32, generator=generator), {"frame_rate": 25.0}]]


LTX2 = FamilySpec(
    name="ltx2", config_class="LTXAV", unet_config=LTX2_CONFIG, latent_shape=VIDEO_SHAPE, conditioning=text,
    latent=nested_latent(VIDEO_SHAPE, AUDIO_SHAPE),
    probe=lambda block, kind: {"video": block.attn1, "audio": block.audio_attn1},
)


class TestLTX2(FamilyContract, InPlaceContract):
    spec = LTX2

    def test_both_streams_are_cached_and_predicted(self, model, nodes):
        """Forced caching moves both outputs off the uncached run's (both
        are predicted), and each stays finite."""
        reference, _ = self.run(model, model, steps=30)
        latent, _ = self.run(model, rfc(nodes, model, **FORCED), steps=30)
        video = torch.Size(VIDEO_SHAPE).numel()
        for ours, theirs in ((latent[:, :video], reference[:, :video]), (latent[:, video:], reference[:, video:])):
            assert torch.isfinite(ours).all()
            assert not torch.equal(ours, theirs)


def test_whole_model_caching_of_audio_and_video(comfy, nodes):
    """granularity model: the packed latent of both streams is the cached
    module; forced caching runs the model on 10 of 30 evaluations."""
    from tiny_models import build

    model = build("LTXAV", LTX2_CONFIG)
    blocks = list(model.model.diffusion_model.transformer_blocks)
    steps = 30
    reference, reference_calls = counted(blocks, lambda: sample_spec(LTX2, model, steps=steps))
    patched = rfc(nodes, model, granularity="model", **FORCED)
    latent, calls = counted(blocks, lambda: sample_spec(LTX2, patched, steps=steps))
    assert calls == reference_calls // steps * (1 + (steps - 1) // 3)
    assert latent.shape == reference.shape == (1, torch.Size(VIDEO_SHAPE).numel() + torch.Size(AUDIO_SHAPE).numel())
    assert torch.isfinite(latent).all()
