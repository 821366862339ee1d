"""The contract every supported model family must meet inside a real ComfyUI.

A family's test file describes a tiny random-weight model built from
ComfyUI's own config class (a `FamilySpec`) and subclasses `FamilyContract`:

    SPEC = FamilySpec(name="wan21", config_class="WAN21_T2V", ...)

    class TestWan21(FamilyContract):
        spec = SPEC

Every test samples through `comfy.sample.sample`, so the real guider,
cond batching, model wrappers and patches are exercised; block executions are
counted with torch hooks, outside the pack.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from rfc_core.run import SHORT_RUN_STEPS
from tiny_models import build, counted

# Forced caching as set at every step count: the mechanics tests' plans
# (forced_steps_plan) are whole evaluations, also on short runs, which the
# node would otherwise give its few-step policy (test_few_step_runs tests that).
FORCED = dict(threshold=10.0, max_skip=2, order=1, start_percent=0.0, end_percent=1.0, short_runs="as set")
NEVER_SKIPS = dict(FORCED, start_percent=0.999)


def forced_steps_plan(steps: int, max_skip: int = FORCED["max_skip"], ends_image: bool = True) -> list[bool]:
    """Which evaluations FORCED computes in a run of `steps`, one evaluation
    per step on a schedule without repeats: RCS warms up on one, then at most
    max_skip are predicted in a row (threshold 10 is never reached on tiny
    models), and a run of at most SHORT_RUN_STEPS steps that ends the image
    (its schedule reaches sigma 0, unlike a first stage that hands on a noisy
    latent) computes its last step."""
    plan, in_row = [], 0
    for step in range(steps):
        last_of_short_run = ends_image and steps <= SHORT_RUN_STEPS and step == steps - 1
        computed = step == 0 or in_row >= max_skip or last_of_short_run
        plan.append(computed)
        in_row = 0 if computed else in_row + 1
    return plan


def forced_full_evaluations(steps: int, max_skip: int = FORCED["max_skip"], ends_image: bool = True) -> int:
    """How many evaluations forced_steps_plan computes."""
    return sum(forced_steps_plan(steps, max_skip, ends_image))


@dataclass
class FamilySpec:
    """name: the adapter family the pack must detect.
    config_class, unet_config: `comfy.supported_models.<config_class>(unet_config)`.
    latent_shape: one sample's latent, (C, H, W) or (C, T, H, W) for video.
    conditioning(batch, seed): a ComfyUI conditioning list, [[cross_attn, extras]].
    counted_modules(diffusion_model): modules whose forward runs exactly once
        per real block execution. Default: the blocks themselves, which is
        right for patches_replace families; object-patched families must name
        a child the block runs (their patched forward is still called
        through the block's `__call__` when it is predicted).
    probe(block, kind): the submodule whose first input is the block's
        module input, to check the adapter computes it exactly; None skips.
        For blocks whose streams are cached apart, a dict: stream -> submodule.
    latent(batch, seed): (latent, noise) for families whose latent is not
        one tensor (LTX-2's video and audio). Default: zeros and seeded noise
        of `latent_shape`.
    prepare(diffusion_model): anything the tiny model needs before use.
    granularity: what the pack must choose for this family.
    overrides: values set on the config class after it is made (see `build`).
    unsupported(): why this ComfyUI cannot run the spec (a reason to skip), or None.
    second_evaluation_computed: FORCED's threshold 10 is crossed at the
        second evaluation (RCS warms up on one, so the second is decided by
        the forecast error), as on a schedule whose first step moves the
        module input more than tenfold.
    reference_tokens: the reference images' tokens at the end of the image
        stream, which the module input leaves out (Flux edit models).
    probe_input(fed, key): the part of the probe's first input that the
        module input of `key` (a module key) covers, where that is not all
        of it (MiniMax H3's probe sees the packed rows of all its streams).
    empty_streams: streams the spec's runs leave empty, which are passed
        through and never cached, so have no module input.
    """

    name: str
    config_class: str
    unet_config: dict
    latent_shape: tuple[int, ...]
    conditioning: Callable[[int, int], list]
    counted_modules: Callable | None = None
    probe: Callable | None = None
    prepare: Callable | None = None
    granularity: str = "blocks"
    steps: int = 12
    latent: Callable | None = None
    extra: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    unsupported: Callable | None = None
    second_evaluation_computed: bool = False
    reference_tokens: int = 0
    probe_input: Callable | None = None
    empty_streams: tuple[str, ...] = ()


def nested_latent(*sample_shapes):
    """FamilySpec.latent for a model whose latent is several tensors (video
    and audio): ComfyUI's NestedTensor of zeros, and seeded noise like it."""
    def latent(batch: int, seed: int):
        import comfy.nested_tensor

        generator = torch.Generator().manual_seed(seed)
        shapes = [(batch, *shape) for shape in sample_shapes]
        zeros = comfy.nested_tensor.NestedTensor([torch.zeros(shape) for shape in shapes])
        noise = comfy.nested_tensor.NestedTensor([torch.randn(shape, generator=generator) for shape in shapes])
        return zeros, noise

    return latent


@pytest.fixture
def caching_never_fails(caplog):
    """Fails a test whose run hit a caching fault: a block-level fault falls
    back to whole model calls, which forced counts and bit-identity alone
    cannot tell from block caching. Test modules use it with
    `pytestmark = pytest.mark.usefixtures("caching_never_fails")`."""
    caplog.set_level("WARNING", logger="ComfyUI-RFC")
    yield
    assert not [record for record in caplog.get_records("call") if "caching failed" in record.getMessage()]


def pack_module(nodes, name: str):
    node_module = nodes.NODE_CLASS_MAPPINGS["RFCCache"].__module__
    return sys.modules[f"{node_module.rsplit('.', 2)[0]}.{name}"]


def rfc(nodes, model, **widgets):
    advanced = any(name in widgets for name in ("estimator", "scheduler", "interval", "granularity", "short_runs",
                                                 "cache_device", "cache_dtype", "cache_span", "memory_budget"))
    node = nodes.NODE_CLASS_MAPPINGS["RFCCacheAdvanced" if advanced else "RFCCache"]()
    return node.apply(model, unique_id="7", **widgets)[0]


def sample_spec(spec: FamilySpec, model_patcher, steps=None, cfg=1.0, batch=1, seed=0,
                sampler="euler", scheduler="simple"):
    import comfy.sample

    if spec.latent is not None:
        latent, noise = spec.latent(batch, seed)
    else:
        shape = (batch, *spec.latent_shape)
        latent = torch.zeros(shape)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    positive = spec.conditioning(batch, 1)
    negative = spec.conditioning(batch, 2)
    result = comfy.sample.sample(model_patcher, noise, steps or spec.steps, cfg, sampler, scheduler, positive,
                                 negative, latent, seed=seed, disable_pbar=True)
    if getattr(result, "is_nested", False):
        # Several latents (LTX-2's video and audio) compared as one: (batch, features).
        return torch.cat([t.reshape(t.shape[0], -1) for t in result.unbind()], dim=1)
    return result


class FamilyContract:
    spec: FamilySpec

    @pytest.fixture(scope="class")
    def model(self, comfy):
        reason = self.spec.unsupported() if self.spec.unsupported is not None else None
        if reason:
            pytest.skip(reason)
        patcher = build(self.spec.config_class, self.spec.unet_config, overrides=self.spec.overrides)
        if self.spec.prepare is not None:
            self.spec.prepare(patcher.model.diffusion_model)
        return patcher

    def counted_modules(self, model):
        diffusion_model = model.model.diffusion_model
        if self.spec.counted_modules is not None:
            return list(self.spec.counted_modules(diffusion_model))
        adapter = self.adapter(model)
        assert all(group.hook == "replace" for group in adapter.block_groups), \
            "object-patched families must name the modules to count"
        return [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]

    def adapter(self, model):
        import nodes

        return pack_module(nodes, "nodes.adapters").detect_adapter(model.model.diffusion_model)

    def run(self, model, patcher, **kwargs):
        return counted(self.counted_modules(model), lambda: sample_spec(self.spec, patcher, **kwargs))

    def test_detected_family_and_granularity(self, model, nodes, caplog):
        caplog.set_level("INFO", logger="ComfyUI-RFC")
        patched = rfc(nodes, model)
        settings = patched.model_options["transformer_options"][pack_module(nodes, "nodes.runtime").SETTINGS_KEY]
        assert settings.granularity == self.spec.granularity
        assert settings.family == self.spec.name
        assert f"RFC: {self.spec.name}" in caplog.text
        assert self.spec.granularity in caplog.text

    @pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 2)])
    def test_cache_that_never_skips_is_bit_identical(self, model, nodes, cfg, batch):
        """Every block goes through the pack and is recorded, but no step is
        in the skip window: the latent must not change by a single bit."""
        reference, reference_calls = self.run(model, model, cfg=cfg, batch=batch)
        latent, calls = self.run(model, rfc(nodes, model, **NEVER_SKIPS), cfg=cfg, batch=batch)
        assert torch.equal(latent, reference)
        assert calls == reference_calls

    def test_threshold_zero_is_bit_identical(self, model, nodes):
        reference, _ = self.run(model, model, cfg=3.0, batch=2)
        latent, _ = self.run(model, rfc(nodes, model, **{**FORCED, "threshold": 0.0}), cfg=3.0, batch=2)
        assert torch.equal(latent, reference)

    @pytest.mark.parametrize("cfg,batch", [(1.0, 1), (3.0, 2)])
    def test_forced_caching_cuts_block_executions_to_about_a_third(self, model, nodes, cfg, batch):
        steps = 30
        reference, reference_calls = self.run(model, model, steps=steps, cfg=cfg, batch=batch)
        latent, calls = self.run(model, rfc(nodes, model, **FORCED), steps=steps, cfg=cfg, batch=batch)
        # one warm-up evaluation, then two predicted and one computed:
        # 1 + 29 // 3 = 10 of 30 evaluations are computed
        full_evaluations = forced_full_evaluations(steps)
        if self.spec.second_evaluation_computed:
            full_evaluations = 1 + forced_full_evaluations(steps - 1)
        assert reference_calls > 0, "the counted modules never ran: count modules the model really calls"
        assert reference_calls % steps == 0
        assert calls == reference_calls // steps * full_evaluations, (calls, reference_calls // steps,
                                                                      full_evaluations)
        assert latent.shape == reference.shape
        assert torch.isfinite(latent).all()
        relative = ((latent - reference).norm() / reference.norm()).item()
        print(f"{self.spec.name} cfg={cfg} batch={batch}: block executions {calls} of {reference_calls}, "
              f"relative difference {relative:.3g}")
        assert relative < 1.0

    def test_module_input_is_what_the_block_feeds_its_first_layer(self, model, nodes, monkeypatch):
        if self.spec.probe is None:
            pytest.skip(f"{self.spec.name}: no probe layer (whole-model caching reads the latent itself)"
                        if self.spec.granularity == "model" else f"{self.spec.name}: no probe layer given")
        diffusion_model = model.model.diffusion_model
        adapter = self.adapter(model)
        base = pack_module(nodes, "nodes.adapters.base")
        # Strides of 4 tokens and at least 2 channels even on tiny models, so
        # a sampled module input is a real sample.
        monkeypatch.setattr(base, "MODULE_INPUT_TOKENS", 4)
        monkeypatch.setattr(base, "MODULE_INPUT_CHANNELS", 8)
        from_adapter, from_block, sampled = {}, {}, []
        full_input, sampled_input = type(adapter).module_input, type(adapter).sampled_module_input
        samples = sampled_input is not base.BlockAdapter.sampled_module_input

        def spy(self_, diffusion_model_, kind, index, args, **stream):
            value = full_input(self_, diffusion_model_, kind, index, args, **stream)
            from_adapter.setdefault((kind, index, *stream.values()), value.clone())
            return value

        def spy_sampled(self_, diffusion_model_, kind, index, args, **stream):
            value = sampled_input(self_, diffusion_model_, kind, index, args, **stream)
            full = spy(self_, diffusion_model_, kind, index, args, **stream)
            if samples:  # every token_stride-th token, every channel_stride-th channel
                full = full[:, ::base.token_stride(full.shape[1])][..., ::base.channel_stride(full.shape[-1])]
            sampled.append(((kind, index, *stream.values()), value.clone(), full.clone()))
            return value

        monkeypatch.setattr(type(adapter), "module_input", spy)
        monkeypatch.setattr(type(adapter), "sampled_module_input", spy_sampled)
        handles = []
        for kind, index in adapter.block_keys(diffusion_model):
            probes = self.spec.probe(adapter.block(diffusion_model, kind, index), kind)
            if not isinstance(probes, dict):
                probes = {None: probes}
            for stream, probe in probes.items():
                if stream in self.spec.empty_streams:
                    continue
                def capture(module, inputs, key=(kind, index) if stream is None else (kind, index, stream)):
                    fed = inputs[0]
                    if self.spec.reference_tokens:
                        fed = fed[:, :fed.shape[1] - self.spec.reference_tokens]
                    if self.spec.probe_input is not None:
                        fed = self.spec.probe_input(fed, key)
                    from_block.setdefault(key, fed.clone())

                handles.append(probe.register_forward_pre_hook(capture))
        try:
            sample_spec(self.spec, rfc(nodes, model, **NEVER_SKIPS), steps=2)
        finally:
            for handle in handles:
                handle.remove()
        module_keys = {key for key in adapter.module_keys(diffusion_model)
                       if not (len(key) > 2 and key[2] in self.spec.empty_streams)}
        assert set(from_adapter) == set(from_block) == module_keys
        for key in from_block:
            torch.testing.assert_close(from_adapter[key], from_block[key], rtol=1e-4, atol=1e-5, msg=str(key))
        # Every block but the first is sampled; what it gets is a sample of its full module input.
        assert sampled or len(from_block) == 1
        for key, value, expected in sampled:
            assert value.shape == expected.shape, key
            self.assert_sampled_input_close(value, expected, key)

    def assert_sampled_input_close(self, value: torch.Tensor, expected: torch.Tensor, key) -> None:
        """A sampled module input against the sample of the full one: equal
        up to float32 summation order. A subclass whose weights make the two
        differ by design (test_quantized_weights) says by how much."""
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=str(key))


def _clone_tensor(value):
    if isinstance(value, tuple):  # LTX-2 passes (video, audio)
        return tuple(_clone_tensor(item) for item in value)
    return value.clone() if isinstance(value, torch.Tensor) else value


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, tuple):
            found += _tensors(value)
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


class _InputCopies:
    """While active, every given block runs on copies of its tensor inputs, so
    nothing it updates in place is seen by the caller."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.handles = []

    def __enter__(self):
        def copy_inputs(module, args, kwargs):
            return tuple(_clone_tensor(a) for a in args), {k: _clone_tensor(v) for k, v in kwargs.items()}

        self.handles = [block.register_forward_pre_hook(copy_inputs, with_kwargs=True) for block in self.blocks]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class _InPlaceWatch:
    """Records whether any given block changed one of its tensor inputs."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.handles = []
        self.updated = False
        self._before = {}

    def __enter__(self):
        def remember(module, args, kwargs):
            self._before[id(module)] = [(t, t.clone()) for t in _tensors([*args, *kwargs.values()])]

        def compare(module, args, kwargs, output):
            self.updated |= any(not torch.equal(t, copy) for t, copy in self._before.pop(id(module)))

        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(remember, with_kwargs=True))
            self.handles.append(block.register_forward_hook(compare, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class InPlaceContract:
    """For families whose blocks may update their inputs in place.

    updates_inputs_in_place: whether this ComfyUI's blocks do, so the copy
    check below is known to guard a real hazard (or to be a plain safeguard).
    """

    updates_inputs_in_place: bool = True

    def all_blocks(self, model):
        diffusion_model = model.model.diffusion_model
        adapter = self.adapter(model)
        return [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]

    def test_blocks_update_inputs_in_place_as_expected(self, model):
        with _InPlaceWatch(self.all_blocks(model)) as watch:
            sample_spec(self.spec, model, steps=2)
        assert watch.updated == self.updates_inputs_in_place

    def test_forced_caching_matches_a_run_on_copied_block_inputs(self, model, nodes):
        """If the pack kept or reused a tensor the block then updates in place
        (a cached feature, the input of a residual), the copies would change
        the result; they must not change a single bit."""
        _, reference_calls = self.run(model, model, cfg=3.0, batch=2)
        latent, calls = self.run(model, rfc(nodes, model, **FORCED), cfg=3.0, batch=2)
        with _InputCopies(self.all_blocks(model)):
            on_copies, calls_on_copies = self.run(model, rfc(nodes, model, **FORCED), cfg=3.0, batch=2)
        assert calls == calls_on_copies < reference_calls
        assert torch.equal(latent, on_copies)


class ObjectPatchIsUndone:
    """For FORWARD families: once the cached model has sampled, the plain
    model sharing its weights must run its blocks' own forward again, with no
    patched forward left behind that still predicts or records."""

    def test_plain_model_runs_original_blocks_after_caching(self, nodes):
        model = build(self.spec.config_class, self.spec.unet_config, overrides=self.spec.overrides)
        if self.spec.prepare is not None:
            self.spec.prepare(model.model.diffusion_model)
        settings = dict(cfg=3.0, batch=2)
        reference, reference_calls = self.run(model, model, **settings)
        _, cached_calls = self.run(model, rfc(nodes, model, **FORCED), **settings)
        latent, calls = self.run(model, model, **settings)

        assert cached_calls < reference_calls
        diffusion_model = model.model.diffusion_model
        adapter = self.adapter(model)
        for key in adapter.block_keys(diffusion_model):
            block = adapter.block(diffusion_model, *key)
            assert getattr(block.forward, "__func__", None) is type(block).forward, key
        assert calls == reference_calls
        assert torch.equal(latent, reference)
