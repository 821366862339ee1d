"""Adapters and block hooks on plain torch stand-ins, without ComfyUI."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benchmarks.methods import PACK_NAME, load_pack
from benchmarks.tiny_flux import TinyFlux

load_pack()
adapters = sys.modules[f"{PACK_NAME}.nodes.adapters"]
base = sys.modules[f"{PACK_NAME}.nodes.adapters.base"]
runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
rfc_core = sys.modules[f"{PACK_NAME}.rfc_core"]


def test_pack_keeps_samples_apart_whatever_the_batch_dim():
    # Cosmos 1 keeps the batch at dim 3: (T, H, W, B, D)
    stream = torch.randn(2, 3, 3, 4, 5)
    packed = base.pack([stream], batch_dim=3)
    assert packed.shape == (4, 2 * 3 * 3 * 5)
    for sample in range(4):
        torch.testing.assert_close(packed[sample], stream[:, :, :, sample].reshape(-1))


def test_pack_copies_so_in_place_block_updates_cannot_reach_it():
    stream = torch.ones(2, 3, 4)
    packed = base.pack([stream])
    stream += 1
    assert torch.equal(packed, torch.ones(2, 12))


@pytest.mark.parametrize("tokens, tail, stride", [(10, 3, 4), (4608, 512, 18), (7, 0, 2), (9, 9, 3), (100, 1, 7)])
def test_sampled_tail_counts_the_kept_tail_tokens(tokens, tail, stride):
    kept = list(range(tokens))[::stride]
    assert base.sampled_tail(tokens, tail, stride) == sum(1 for t in kept if t >= tokens - tail)


@pytest.mark.parametrize("channels", [64, 3072, 3840, 5120, 1000, 257])
def test_channel_stride_divides_the_width(channels):
    stride = base.channel_stride(channels)
    assert channels % stride == 0 and channels // stride >= base.MODULE_INPUT_CHANNELS or stride == 1


def _class(module: str, name: str, parent=torch.nn.Module):
    cls = types.new_class(name, (parent,))
    cls.__module__, cls.__qualname__ = module, name
    return cls


def test_the_most_specific_adapter_wins_and_unknown_models_get_none():
    flux = _class("comfy.ldm.flux.model", "Flux")
    chroma = _class("comfy.ldm.chroma.model", "Chroma", flux)
    derived = _class("some_pack.models", "MyFlux", flux)
    assert adapters.detect_adapter(flux()).family == "flux"
    assert adapters.detect_adapter(chroma()).family == "chroma"
    assert adapters.detect_adapter(derived()).family == "flux"
    assert adapters.detect_adapter(_class("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel")()) is None


def test_every_adapter_is_well_formed():
    families = [adapter.family for adapter in adapters.ADAPTERS]
    assert len(families) == len(set(families)), "two adapters claim one family name"
    for adapter in adapters.ADAPTERS:
        assert adapter.model_classes and all(name.startswith("comfy.ldm.") for name in adapter.model_classes)
        assert adapter.block_groups, adapter.family
        for group in adapter.block_groups:
            assert group.hook in (base.REPLACE, base.FORWARD)
            assert group.streams
            if group.hook == base.REPLACE:
                assert group.outputs is None, "a replace patch returns its streams by name"


# A Flux small enough to build in milliseconds; tests set its depth.
SMALL_FLUX = {"in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 8, "hidden_size": 32,
              "mlp_ratio": 2.0, "num_heads": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "guidance_embed": False}


def test_flux_module_input_is_what_the_block_feeds_its_first_linear():
    torch.manual_seed(0)
    model = TinyFlux({**SMALL_FLUX, "depth": 1, "depth_single_blocks": 1})
    adapter = adapters.adapter_for("flux")
    img, txt, vec = torch.randn(2, 16, 32), torch.randn(2, 3, 32), torch.randn(2, 32)
    seen = []
    for kind, first_linear, args in (("double_block", model.double_blocks[0].img_attn.qkv, {"img": img, "txt": txt}),
                                     ("single_block", model.single_blocks[0].linear1, {"img": img})):
        handle = first_linear.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        block = adapter.block(model, kind, 0)
        pe = model.positional_embedding(2, 0 if kind == "single_block" else 3, 4, 4, "cpu")
        with torch.no_grad():
            block(*args.values(), vec, pe)
        handle.remove()
        torch.testing.assert_close(adapter.module_input(model, kind, 0, {**args, "vec": vec}), seen[-1])


def test_flux_sampled_module_input_is_a_sample_of_the_full_one_and_its_rows_go_with_the_run(monkeypatch):
    """Every 4th token and 8th channel, from the stacked modulation rows (one
    matmul for every block): equal to the full module input sampled, and the
    stack is dropped when the run ends."""
    torch.manual_seed(0)
    model = TinyFlux({**SMALL_FLUX, "depth": 2, "depth_single_blocks": 2})
    adapter = adapters.adapter_for("flux")
    monkeypatch.setattr(base, "MODULE_INPUT_TOKENS", 4)
    monkeypatch.setattr(base, "MODULE_INPUT_CHANNELS", 4)
    args = {"img": torch.randn(2, 16, 32), "txt": torch.randn(2, 3, 32), "vec": torch.randn(2, 32)}
    with torch.no_grad():
        for kind, index in adapter.block_keys(model):
            full = adapter.module_input(model, kind, index, args)
            sampled = adapter.sampled_module_input(model, kind, index, args)
            torch.testing.assert_close(sampled, full[:, ::4, ::8])
    assert adapter.__dict__["_sampled_rows"].get(model) is not None
    adapter.end_run(model)
    assert model not in adapter.__dict__["_sampled_rows"]


class StandInBlock(torch.nn.Module):
    """A block with no patch point, like Lumina2's: it can only be hooked by
    replacing its forward. It doubles as a counter of real executions."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)
        self.calls = 0

    def forward(self, x, scale, extra=None):
        self.calls += 1
        return x + torch.tanh(self.linear(x)) * scale


class StandInModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(StandInBlock() for _ in range(3))

    def forward(self, x, scale):
        for layer in self.layers:
            x = layer(x, scale)
        return x


class StandInAdapter(base.BlockAdapter):
    family = "stand_in"
    block_groups = (base.BlockGroup("layer", "layers", ("x",), hook=base.FORWARD),)


def _sample(evaluate, steps=12):
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        sigma = 1.0 - step / steps
        x = x - 0.1 * evaluate(x, torch.tensor(sigma))
    return x


# threshold 10, max_skip 2: computed at steps 0, 3, 6 and 9, 3 layers each.
@pytest.mark.parametrize("threshold,expected_calls", [(0.0, 36), (10.0, 12)])
def test_object_patched_forward_predicts_and_restores(threshold, expected_calls):
    torch.manual_seed(0)
    model = StandInModel()
    with torch.no_grad():
        reference = _sample(model)
    for layer in model.layers:
        layer.calls = 0
    adapter = StandInAdapter()
    config = rfc_core.CacheConfig(threshold=threshold, max_skip=2, order=1)
    settings = runtime.CacheSettings(config, "stand_in", "blocks", adapter, ("layer", 0), None)
    session = runtime.SamplingSession(settings, model, None)
    for index, layer in enumerate(model.layers):
        layer.forward = runtime.CachedForward("layer", index, ("x",), types.MethodType(StandInBlock.forward, layer),
                                              block_path=f"layers.{index}")

    def evaluate(x, sigma):
        session.start_evaluation(float(sigma))
        token = runtime._ACTIVE_CALL.set(runtime.ActiveCall(session, {"cond_or_uncond": [0]}, model))
        try:
            return model(x, sigma)
        finally:
            runtime._ACTIVE_CALL.reset(token)

    with torch.no_grad():
        latent = _sample(evaluate)
    session.finish()
    assert not session.caching_off
    assert sum(layer.calls for layer in model.layers) == expected_calls
    if threshold == 0.0:
        assert torch.equal(latent, reference)
    else:
        assert torch.isfinite(latent).all()
        assert ((latent - reference).norm() / reference.norm()).item() < 0.1
