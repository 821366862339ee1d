"""OmniGen2: object-patched main layers over the [text | reference | image] sequence."""

from __future__ import annotations

from family_harness import FamilyContract, FamilySpec
from family_harness import ObjectPatchIsUndone
from test_family_lumina2 import text_conditioning

OMNIGEN2_CONFIG = {
    "image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 2,
    "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "axes_dim_rope": [8, 12, 12],
    "axes_lens": [1024, 1664, 1664], "text_feat_dim": 32, "timestep_scale": 1000.0,
}

SPEC = FamilySpec(
    name="omnigen2",
    config_class="Omnigen2",
    unet_config=OMNIGEN2_CONFIG,
    latent_shape=(16, 16, 16),
    conditioning=text_conditioning,
    counted_modules=lambda dm: [layer.attn for layer in dm.layers],
    probe=lambda block, kind: block.attn.to_q,
)


class TestOmniGen2(FamilyContract, ObjectPatchIsUndone):
    spec = SPEC
