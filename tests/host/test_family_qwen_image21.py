"""Qwen-Image 2.1 (`QwenImage21Transformer2DModel`, ComfyUI v0.37 and later;
here the v0.39.0 model file from `../shared/comfy_overlay` laid over v0.31.0).
The model caches its text and reference prefix K/V itself and turns that off
when any block patch exists: RFC object-patches the blocks instead, so the
model's cache is still filled at the first step and read at every later one
while RFC caches the target rows."""

from __future__ import annotations

import importlib.util

import torch

from family_harness import FORCED, NEVER_SKIPS, FamilyContract, FamilySpec, rfc, sample_spec

QWEN21_CONFIG = {
    "image_model": "qwen_image21", "in_channels": 64, "out_channels": 64, "num_layers": 3, "attention_head_dim": 32,
    "num_attention_heads": 2, "context_in_dim": 32, "mlp_ratio": 2, "axes_dims_rope": (8, 12, 12),
}
LATENT_SHAPE = (64, 8, 8)


def unsupported() -> str | None:
    if importlib.util.find_spec("comfy.ldm.qwen_image21") is None:
        return "this ComfyUI has no Qwen-Image 2.1 (v0.37 and later: run the host tests on the overlaid tree)"
    return None


def with_reference(batch: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(11))
    return [[torch.randn(batch, 6, 32, generator=generator), {"reference_latents": [reference]}]]


# The target image's rows: its 8 x 8 latent, one row per position.
IMAGE_ROWS = LATENT_SHAPE[1] * LATENT_SHAPE[2]


class TargetRowCalls:
    """A block's feed-forward, counted on the calls over the target rows only:
    the first step's extra call, which computes the prefix rows to fill the
    model's own K/V cache, is the model's work, not a step of the block."""

    def __init__(self, module):
        self.module = module

    def register_forward_hook(self, hook):
        def on_target_rows(module, inputs, output):
            if inputs[0].shape[1] == IMAGE_ROWS:
                hook(module, inputs, output)

        return self.module.register_forward_hook(on_target_rows)


QWEN21 = FamilySpec(name="qwen_image21", config_class="QwenImage21", unet_config=QWEN21_CONFIG,
                    latent_shape=LATENT_SHAPE, conditioning=with_reference, unsupported=unsupported,
                    counted_modules=lambda diffusion_model: [TargetRowCalls(block.img_mlp) for block in
                                                             diffusion_model.transformer_blocks])


class PrefixCacheSpy:
    """Counts the model's own prefix cache look-ups and hits from outside."""

    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model
        self.lookups = self.hits = 0

    def __enter__(self):
        select = type(self.diffusion_model).select_prefix_cache

        def spy(model, *args, **kwargs):
            found = select(model, *args, **kwargs)
            self.lookups += 1
            self.hits += bool(found[1])
            return found

        self.diffusion_model.select_prefix_cache = spy.__get__(self.diffusion_model)
        return self

    def __exit__(self, *exc):
        del self.diffusion_model.select_prefix_cache


class TestQwenImage21(FamilyContract):
    spec = QWEN21

    def test_the_models_prefix_cache_stays_on_under_rfc(self, model, nodes):
        """One look-up per model call, every one after the first a hit, with
        RFC attached as without it; threshold 0 bit-identical to the plain run."""
        steps = 6
        runs = {}
        for name, patcher in (("plain", model), ("rfc threshold 0", rfc(nodes, model, **{**FORCED, "threshold": 0.0})),
                              ("rfc never skips", rfc(nodes, model, **NEVER_SKIPS))):
            with PrefixCacheSpy(model.model.diffusion_model) as spy:
                latent = sample_spec(self.spec, patcher, steps=steps)
            runs[name] = (latent, spy.lookups, spy.hits)
        reference, lookups, hits = runs["plain"]
        assert lookups == steps and hits == steps - 1, (lookups, hits)
        for name in ("rfc threshold 0", "rfc never skips"):
            latent, rfc_lookups, rfc_hits = runs[name]
            assert (rfc_lookups, rfc_hits) == (lookups, hits), name
            assert torch.equal(latent, reference), name

    def test_forced_caching_reads_the_prefix_cache_on_computed_steps(self, model, nodes):
        """Predicted evaluations run no block; computed ones still read the
        model's prefix K/V (one look-up per model call, hits after the first)."""
        steps = 12
        with PrefixCacheSpy(model.model.diffusion_model) as spy:
            latent = sample_spec(self.spec, rfc(nodes, model, **FORCED), steps=steps)
        assert spy.lookups == steps and spy.hits == steps - 1
        assert torch.isfinite(latent).all()

    def test_module_input_is_what_the_block_feeds_its_attention_on_the_target_rows(self, model, nodes, monkeypatch):
        """The target call's attention input, against the adapter's module
        input; the first step's prefix call (prefix rows only, which fills the
        model's K/V cache) is neither cached nor given a module input."""
        from family_harness import pack_module

        adapter = pack_module(nodes, "nodes.adapters").detect_adapter(model.model.diffusion_model)
        module_input = type(adapter).module_input
        ours, theirs = {}, {}

        def spy(self_, diffusion_model, kind, index, args, **stream):
            value = module_input(self_, diffusion_model, kind, index, args, **stream)
            ours.setdefault(index, []).append(value.clone())
            return value

        monkeypatch.setattr(type(adapter), "module_input", spy)
        monkeypatch.setattr(type(adapter), "sampled_module_input", spy)
        handles = []
        for index, block in enumerate(model.model.diffusion_model.transformer_blocks):
            def capture(module, inputs, index=index):
                if inputs[0].shape[1] == IMAGE_ROWS:  # the target call; the prefix call has the other rows
                    theirs.setdefault(index, []).append(inputs[0].clone())
            handles.append(block.attn.register_forward_pre_hook(capture))
        try:
            sample_spec(self.spec, rfc(nodes, model, **NEVER_SKIPS), steps=2)
        finally:
            for handle in handles:
                handle.remove()
        assert sorted(ours) == sorted(theirs) == [0, 1, 2]
        for index in ours:
            assert len(ours[index]) == len(theirs[index]) == 2
            for value, expected in zip(ours[index], theirs[index]):
                torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)
