"""Kandinsky 6 (`Kandinsky6NativeAVDiT`, ComfyUI after v0.31; here from
`../shared/comfy_overlay` laid over v0.31.0): fused video and audio blocks
through `patches_replace["dit"]["double_block"]`, each stream cached apart,
and the model's own MagCache refused beside RFC in either order."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from family_harness import FORCED, FamilyContract, FamilySpec, nested_latent, rfc, sample_spec

K6_CONFIG = {
    "image_model": "kandinsky6", "in_visual_dim": 16, "out_visual_dim": 16, "in_audio_dim": 40, "in_text_dim": 32,
    "in_text_dim2": 16, "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": (2 * 16 + 1) * 4,
    "time_dim_a": 32, "model_dim_a": 32, "ff_dim_a": 64, "head_dim_a": 32, "axes_dims": (8, 12, 12),
    "num_text_blocks": 1, "num_visual_blocks": 3,
}
VIDEO_SHAPE, AUDIO_SHAPE = (16, 2, 4, 4), (5, 40)


def unsupported() -> str | None:
    if importlib.util.find_spec("comfy.ldm.kandinsky6") is None:
        return "this ComfyUI has no Kandinsky 6 (newer than v0.31: run the host tests on the overlaid tree)"
    return None




def text(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 7, 32, generator=generator), {"pooled_output": torch.randn(batch, 16,
                                                                                              generator=generator)}]]


K6 = FamilySpec(
    name="kandinsky6", config_class="Kandinsky6", unet_config=K6_CONFIG, latent_shape=VIDEO_SHAPE, conditioning=text,
    latent=nested_latent(VIDEO_SHAPE, AUDIO_SHAPE), unsupported=unsupported,
    probe=lambda block, kind: {"visual": block.videoT.self_attention, "audio": block.audioT.self_attention},
)


class TestKandinsky6(FamilyContract):
    spec = K6

    @pytest.mark.parametrize("order", ["magcache_then_rfc", "rfc_then_magcache"])
    def test_its_own_magcache_is_refused_in_either_order(self, model, nodes, order):
        """MagCache skips every block of an evaluation on its own schedule:
        RFC after it is refused when the node runs, MagCache after RFC when
        sampling starts, before any block runs; both name the two caches."""
        import comfy_extras.nodes_overlay_newer as overlay_nodes

        def magcache(patcher):
            output = overlay_nodes.Kandinsky6MagCache.execute(patcher, 4, 10.0, 1, 0.0)
            return output.result[0] if hasattr(output, "result") else output[0]

        message = "Kandinsky 6's MagCache.*RFC Cache|RFC Cache.*Kandinsky 6's MagCache"
        if order == "magcache_then_rfc":
            with pytest.raises(ValueError, match=message):
                rfc(nodes, magcache(model), **FORCED)
        else:
            calls = []
            handle = model.model.diffusion_model.visual_blocks[0].register_forward_hook(lambda *_: calls.append(1))
            try:
                with pytest.raises(ValueError, match=message):
                    sample_spec(self.spec, magcache(rfc(nodes, model, **FORCED)), steps=4)
            finally:
                handle.remove()
            assert not calls
