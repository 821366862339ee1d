"""LTX-2.5: ComfyUI loads its checkpoints into the LTX-2 class, `LTXAVModel`,
which the pack caches at block level (the `ltx2` adapter).

What the stored ComfyUI files after v0.31 say (Comfy-Org/ComfyUI up to
v0.39-era commits, zhongzichang/ComfyUI v0.39.0): there is no LTX-2.5 config
class or model file. `model_detection` sends every checkpoint with
`audio_adaln_single` weights to the `LTXAV` config (image_model "ltxav"),
takes the transformer's settings from the file's metadata, and later
versions set `use_keyframes_abs_pos_embedding` from the key's presence.
`LTXAVModel` gained the settings LTX-2.5 needs after v0.31: `ff_bias`
(published LTX-2.5 transformers have no video FFN bias) and the learned
keyframe marker added to single-pixel-frame tokens
(`use_keyframes_abs_pos_embedding`); its blocks and their patch arguments
are LTX-2's.

So these tests need the newer LTX files: they run on v0.31.0 with
`../shared/comfy_overlay` laid over it and skip elsewhere. On plain v0.31.0
`LTXAVModel` swallows both settings (`**kwargs`): an LTX-2.5 checkpoint
would load with its FFN biases missing and its keyframe marker dropped,
which is ComfyUI's to fix (its LTX-2.5 templates ask for v0.39).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from family_harness import (FamilyContract, FamilySpec, InPlaceContract, caching_never_fails,  # noqa: F401
                            nested_latent, pack_module, sample_spec)
from test_family_ltx2 import AUDIO_SHAPE, LTX2_CONFIG, VIDEO_SHAPE, text
from tiny_models import build

# A fault would fall back to whole model calls: every test here fails on one.
pytestmark = pytest.mark.usefixtures("caching_never_fails")

# What the published LTX-2.5 transformers set beyond LTX-2.3's config.
LTX25_SETTINGS = {"ff_bias": False, "audio_ff_bias": True, "use_prompt_adaln_single": True,
                  "use_keyframes_abs_pos_embedding": True}


def newer_ltx_files() -> str | None:
    """Why this ComfyUI cannot build an LTX-2.5 transformer, or None."""
    import importlib.util

    if importlib.util.find_spec("comfy.ldm.lightricks.av_model") is None:
        return "this ComfyUI has no LTX-2 class (LTXAVModel), which LTX-2.5 checkpoints load into"
    import comfy.ldm.lightricks.av_model as av_model
    import comfy.ldm.lightricks.model as model

    missing = [name for name, init in (("ff_bias", av_model.LTXAVModel.__init__),
                                       ("use_keyframes_abs_pos_embedding", model.LTXBaseModel.__init__))
               if name not in inspect.signature(init).parameters]
    if missing:
        return (f"this ComfyUI's LTXAVModel has no {' or '.join(missing)}: LTX-2.5 checkpoints need the LTX files "
                f"of ComfyUI after v0.31 (run the host tests on the tree with ../shared/comfy_overlay laid over it)")
    return None


def detected_config() -> tuple:
    """(config class, unet_config) as ComfyUI's detection makes them from a
    tiny LTX-2.5 checkpoint: its weights' keys and shapes, and the
    transformer settings its metadata carries."""
    import comfy.model_detection

    checkpoint = build("LTXAV", {**LTX2_CONFIG, **LTX25_SETTINGS}).model.diffusion_model.state_dict()
    transformer = {key: value for key, value in {**LTX2_CONFIG, **LTX25_SETTINGS}.items() if key != "image_model"}
    model_config = comfy.model_detection.model_config_from_unet(
        checkpoint, "", metadata={"config": json.dumps({"transformer": transformer})})
    return model_config, checkpoint


LTX25 = FamilySpec(
    name="ltx2", config_class="LTXAV", unet_config={**LTX2_CONFIG, **LTX25_SETTINGS}, latent_shape=VIDEO_SHAPE,
    conditioning=text, latent=nested_latent(VIDEO_SHAPE, AUDIO_SHAPE),
    probe=lambda block, kind: {"video": block.attn1, "audio": block.audio_attn1},
    unsupported=newer_ltx_files,
)


class TestLTX25(FamilyContract, InPlaceContract):
    spec = LTX25

    @pytest.fixture(scope="class")
    def model(self, comfy):
        reason = newer_ltx_files()
        if reason:
            pytest.skip(reason)
        model_config, _ = detected_config()
        return build(type(model_config).__name__, model_config.unet_config)

    def test_detected_as_the_ltx2_class_with_the_ltx25_settings(self, model, nodes):
        model_config, checkpoint = detected_config()
        assert type(model_config).__name__ == "LTXAV"
        assert {key: model_config.unet_config.get(key) for key in LTX25_SETTINGS} == LTX25_SETTINGS
        diffusion_model = model.model.diffusion_model
        assert type(diffusion_model).__name__ == "LTXAVModel"
        assert set(diffusion_model.state_dict()) == set(checkpoint), "the detected class takes the checkpoint's keys"
        blocks = [name for name in checkpoint if name.startswith("transformer_blocks.") and name.endswith("bias")]
        assert not [name for name in blocks if ".ff.net." in name], "the blocks' video FFN has no bias"
        assert [name for name in blocks if ".audio_ff.net." in name], "the blocks' audio FFN has its bias"
        assert diffusion_model.keyframes_abs_pos_embedding is not None
        assert pack_module(nodes, "nodes.adapters").detect_adapter(diffusion_model).family == "ltx2"

    def test_the_keyframe_marker_reaches_the_blocks(self, model):
        """The first latent frame's tokens get the learned marker: the
        output moves when it is zeroed (the contract above runs with it)."""
        diffusion_model = model.model.diffusion_model
        with_marker = sample_spec(self.spec, model, steps=2)
        kept = diffusion_model.keyframes_abs_pos_embedding.detach().clone()
        try:
            with torch.no_grad():
                diffusion_model.keyframes_abs_pos_embedding.zero_()
            without = sample_spec(self.spec, model, steps=2)
        finally:
            with torch.no_grad():
                diffusion_model.keyframes_abs_pos_embedding.copy_(kept)
        assert not torch.equal(with_marker, without)
