"""Tiny model specs several test files share: Flux, and the three the hard-case
tests run on (Flux, Wan with block patch points, Lumina 2 object-patched)."""

from __future__ import annotations

from family_harness import FamilySpec
from test_family_lumina2 import SPEC as LUMINA2_SPEC
from test_family_wan import WAN21_SPEC
from tiny_models import FLUX_CONFIG, conditioning

FLUX_SPEC = FamilySpec(name="flux", config_class="Flux", unet_config=FLUX_CONFIG, latent_shape=(16, 16, 16),
                       conditioning=lambda batch, seed: conditioning(batch, seed=seed))
SPECS = {"flux": FLUX_SPEC, "wan": WAN21_SPEC, "lumina2": LUMINA2_SPEC}
