"""Wan under ComfyUI's low-VRAM loading, with weights stored in half precision.

Wan's block keeps its adaLN table as a bare `modulation` parameter, which no
cast layer of ComfyUI's owns: the block itself casts it to the hidden state's
dtype and device on every call, and so does the adapter's module input
(`attention_shift_scale`). This runs the whole Wan contract with every layer
of the model offloaded (`--novram`'s load: `lowvram_model_memory` 0.1, so
every cast layer casts its weights per call and the blocks' own parameters
stay where the loader left them), the weights in float16 and the compute in
float32. Dynamic VRAM (comfy-aimdo) needs a CUDA device and is not run here;
it moves such loose parameters onto the device in the model dtype, which the
same cast covers.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FamilyContract, sample_spec
from test_family_wan import WAN21_SPEC
from tiny_models import build

HALF_WEIGHTS_FLOAT_COMPUTE = (torch.float16, torch.float32)


@pytest.fixture
def low_vram(comfy, monkeypatch):
    """Every model load is a low-VRAM one (ComfyUI's NO_VRAM amount), from
    an unloaded start, whatever the device."""
    import comfy.model_management as model_management

    original = model_management.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, 0.1, force_patch_weights=force_patch_weights)

    monkeypatch.setattr(model_management.LoadedModel, "model_load", model_load)
    model_management.unload_all_models()
    yield
    model_management.unload_all_models()


@pytest.mark.usefixtures("low_vram")
class TestWan21LowVram(FamilyContract):
    spec = WAN21_SPEC

    @pytest.fixture(scope="class")
    def model(self, comfy):
        return build(self.spec.config_class, self.spec.unet_config, dtypes=HALF_WEIGHTS_FLOAT_COMPUTE)

    def test_the_model_runs_offloaded_with_half_precision_modulation(self, model):
        """What the contract above runs under: not a full load, the block's
        layers casting their weights per call, its modulation in float16
        while the hidden state is float32."""
        block = model.model.diffusion_model.blocks[0]
        seen = {}

        def record(module, args, kwargs):
            seen["x"] = kwargs.get("x", args[0] if args else None)

        handle = block.register_forward_pre_hook(record, with_kwargs=True)
        try:
            sample_spec(self.spec, model, steps=1)
        finally:
            handle.remove()
        assert model.model.model_lowvram
        assert block.self_attn.q.comfy_cast_weights
        assert block.modulation.dtype == torch.float16
        assert seen["x"].dtype == torch.float32


class TestWan21LowVramPatched(TestWan21LowVram):
    """The same with a weight patch (a LoRA's diff) on every block's
    modulation parameter and query weight: the module input must still be
    what the patched block feeds its query layer, however low-VRAM loading
    applies the patch to a parameter no cast layer owns."""

    @pytest.fixture(scope="class")
    def model(self, comfy):
        patcher = build(self.spec.config_class, self.spec.unet_config, dtypes=HALF_WEIGHTS_FLOAT_COMPUTE)
        generator = torch.Generator().manual_seed(3)
        patches = {}
        for name, parameter in patcher.model.diffusion_model.named_parameters():
            if name.startswith("blocks.") and name.endswith((".modulation", ".self_attn.q.weight")):
                patches[f"diffusion_model.{name}"] = (torch.randn(parameter.shape, generator=generator) * 0.05,)
        patched = patcher.clone()
        assert len(patched.add_patches(patches, 1.0)) == 2 * len(patcher.model.diffusion_model.blocks)
        return patched

    def test_the_patches_reach_the_output(self, model):
        unpatched = build(self.spec.config_class, self.spec.unet_config, dtypes=HALF_WEIGHTS_FLOAT_COMPUTE)
        assert not torch.equal(sample_spec(self.spec, model, steps=2), sample_spec(self.spec, unpatched, steps=2))
