"""One RFC-patched model used more than once: hires fix, split sampling,
repeated runs, changing shapes, two experts, RFC applied twice.

Every sampling run opens its own cache session, so whatever a run leaves in
the patched model must not change the next one: each run here is compared,
bit for bit and block execution for block execution, with the same run on a
freshly patched model. Sampling goes through ComfyUI's own KSampler,
KSamplerAdvanced and LatentUpscaleBy nodes, as a workflow would.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, NEVER_SKIPS, FamilySpec, forced_full_evaluations, pack_module, rfc
from test_family_wan import SWITCH_STEP, WAN21_SPEC, expert_pass
from shared_specs import SPECS
from tiny_models import build, counted


STEPS = 12
CFG = 3.0
HIRES_SCALE = 1.5


def computed_evaluations(steps: int, ends_image: bool = True) -> int:
    """Evaluations FORCED computes in a run of `steps` (forced_steps_plan)."""
    return forced_full_evaluations(steps, ends_image=ends_image)


class Family:
    """A tiny model of one spec, and ComfyUI's sampler nodes run on it with
    real block executions counted from outside the pack."""

    def __init__(self, spec: FamilySpec):
        self.spec = spec
        self.model = build(spec.config_class, spec.unet_config)
        if spec.prepare is not None:
            spec.prepare(self.model.model.diffusion_model)

    def blocks(self):
        diffusion_model = self.model.model.diffusion_model
        if self.spec.counted_modules is not None:
            return list(self.spec.counted_modules(diffusion_model))
        import nodes

        adapter = pack_module(nodes, "nodes.adapters").detect_adapter(diffusion_model)
        return [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]

    def empty_latent(self, batch: int = 1, scale: float = 1.0) -> torch.Tensor:
        *leading, height, width = self.spec.latent_shape
        return torch.zeros(batch, *leading, round(height * scale), round(width * scale))

    def prompts(self, batch: int):
        return self.spec.conditioning(batch, 1), self.spec.conditioning(batch, 2)

    def ksampler(self, patcher, latent, steps=STEPS, cfg=CFG, seed=0, denoise=1.0):
        """nodes.KSampler; returns the latent and the block executions."""
        import nodes

        positive, negative = self.prompts(latent.shape[0])
        return counted(self.blocks(), lambda: nodes.KSampler().sample(
            patcher, seed, steps, cfg, "euler", "simple", positive, negative, {"samples": latent},
            denoise=denoise)[0]["samples"])

    def ksampler_advanced(self, patcher, latent, start, end, add_noise, leftover_noise, steps=STEPS, cfg=CFG, seed=0):
        """nodes.KSamplerAdvanced: steps `start` to `end` of a `steps` schedule."""
        import nodes

        positive, negative = self.prompts(latent.shape[0])
        switch = {True: "enable", False: "disable"}
        return counted(self.blocks(), lambda: nodes.KSamplerAdvanced().sample(
            patcher, switch[add_noise], seed, steps, cfg, "euler", "simple", positive, negative,
            {"samples": latent}, start, end, switch[leftover_noise])[0]["samples"])


def upscale(latent: torch.Tensor) -> torch.Tensor:
    import nodes

    return nodes.LatentUpscaleBy().upscale({"samples": latent}, "bilinear", HIRES_SCALE)[0]["samples"]


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, comfy):
    return Family(SPECS[request.param])


def test_hires_fix_second_pass_on_the_same_patched_model_matches_a_fresh_one(family, nodes):
    """Sample small, upscale the latent, sample again with denoise 0.5 on the
    same patched model: the second pass must not see the first pass's cache."""
    patched = rfc(nodes, family.model, **FORCED)
    small = family.empty_latent()
    base, base_calls = family.ksampler(patched, small)
    upscaled = upscale(base)
    hires, hires_calls = family.ksampler(patched, upscaled, denoise=0.5)
    fresh_hires, fresh_hires_calls = family.ksampler(rfc(nodes, family.model, **FORCED), upscaled, denoise=0.5)
    _, full_base_calls = family.ksampler(family.model, small)
    _, full_hires_calls = family.ksampler(family.model, upscaled, denoise=0.5)

    assert upscaled.shape == family.empty_latent(scale=HIRES_SCALE).shape
    assert hires.shape == upscaled.shape
    assert torch.equal(hires, fresh_hires)
    assert hires_calls == fresh_hires_calls
    # denoise 0.5 still runs STEPS evaluations (of a 2 * STEPS schedule), and both passes cache
    assert base_calls == full_base_calls // STEPS * computed_evaluations(STEPS)
    assert hires_calls == full_hires_calls // STEPS * computed_evaluations(STEPS)
    assert torch.isfinite(hires).all()


def test_split_sampling_passes_each_cache_and_the_second_matches_a_fresh_model(family, nodes):
    """KSamplerAdvanced steps 0-6 with leftover noise, then 6-12 without adding
    noise, both on one patched model. Each pass is its own run: its cache
    warms up again, and the second pass gives what a fresh model gives."""
    half = STEPS // 2
    start = family.empty_latent()
    patched = rfc(nodes, family.model, **FORCED)
    switched, first_calls = family.ksampler_advanced(patched, start, 0, half, add_noise=True, leftover_noise=True)
    final, second_calls = family.ksampler_advanced(patched, switched, half, STEPS, add_noise=False,
                                                   leftover_noise=False)
    fresh_final, fresh_second_calls = family.ksampler_advanced(rfc(nodes, family.model, **FORCED), switched, half,
                                                               STEPS, add_noise=False, leftover_noise=False)
    _, full_first_calls = family.ksampler_advanced(family.model, start, 0, half, add_noise=True,
                                                   leftover_noise=True)

    assert torch.equal(final, fresh_final)
    assert second_calls == fresh_second_calls
    per_evaluation = full_first_calls // half
    # The first pass hands on a noisy latent; the second ends the image, and
    # as a short run computes its last step.
    assert first_calls == per_evaluation * computed_evaluations(half, ends_image=False)
    assert second_calls == per_evaluation * computed_evaluations(half)
    assert torch.isfinite(final).all()


def test_split_sampling_with_a_cache_that_never_skips_is_bit_identical(family, nodes):
    half = STEPS // 2
    start = family.empty_latent()
    patched = rfc(nodes, family.model, **NEVER_SKIPS)
    outputs = []
    for model in (family.model, patched):
        switched, first_calls = family.ksampler_advanced(model, start, 0, half, add_noise=True, leftover_noise=True)
        final, second_calls = family.ksampler_advanced(model, switched, half, STEPS, add_noise=False,
                                                       leftover_noise=False)
        outputs.append((switched, final, first_calls, second_calls))
    (reference_switched, reference, *reference_calls), (switched, final, *calls) = outputs
    assert torch.equal(switched, reference_switched)
    assert torch.equal(final, reference)
    assert calls == reference_calls


def test_second_run_on_the_same_patched_model_matches_a_fresh_one(family, nodes):
    patched = rfc(nodes, family.model, **FORCED)
    latent = family.empty_latent(batch=2)
    first, first_calls = family.ksampler(patched, latent)
    second, second_calls = family.ksampler(patched, latent)
    fresh, fresh_calls = family.ksampler(rfc(nodes, family.model, **FORCED), latent)
    _, full_calls = family.ksampler(family.model, latent)

    assert torch.equal(first, second) and torch.equal(second, fresh)
    assert first_calls == second_calls == fresh_calls == full_calls // STEPS * computed_evaluations(STEPS)


def test_resolution_batch_and_steps_may_change_between_runs(family, nodes):
    """Runs of different shapes and lengths in a row on one patched model
    each match the same run on a freshly patched model; nothing is resized,
    mixed up or carried over, and the first setting afterwards still gives
    what it gave at first."""
    patched = rfc(nodes, family.model, **FORCED)
    runs = [dict(latent=family.empty_latent(batch=1), steps=STEPS),
            dict(latent=family.empty_latent(batch=2, scale=HIRES_SCALE), steps=8),
            dict(latent=family.empty_latent(batch=1, scale=HIRES_SCALE), steps=STEPS),
            dict(latent=family.empty_latent(batch=1), steps=STEPS)]
    in_a_row = [family.ksampler(patched, **run) for run in runs]
    for run, (latent, calls) in zip(runs, in_a_row):
        fresh, fresh_calls = family.ksampler(rfc(nodes, family.model, **FORCED), **run)
        _, full_calls = family.ksampler(family.model, **run)
        assert latent.shape == run["latent"].shape
        assert torch.equal(latent, fresh)
        assert calls == fresh_calls == full_calls // run["steps"] * computed_evaluations(run["steps"])
    assert torch.equal(in_a_row[0][0], in_a_row[-1][0])


def test_branches_with_different_settings_on_one_model_do_not_mix(family, nodes):
    """One loader feeding a cached branch, a never-skipping branch and the
    plain model, sampled in turn: they share the diffusion model (and, for
    object-patched families, its blocks' forward), never their settings."""
    latent = family.empty_latent()
    reference, reference_calls = family.ksampler(family.model, latent)
    cached_branch = rfc(nodes, family.model, **FORCED)
    exact_branch = rfc(nodes, family.model, **NEVER_SKIPS)
    results = [family.ksampler(model, latent)
               for model in (cached_branch, exact_branch, family.model, cached_branch, exact_branch)]
    (cached, cached_calls), (exact, exact_calls), (plain, plain_calls), (cached_again, cached_again_calls), \
        (exact_again, exact_again_calls) = results

    assert cached_calls == cached_again_calls == reference_calls // STEPS * computed_evaluations(STEPS)
    assert torch.equal(cached, cached_again)
    for latent_out, calls in ((exact, exact_calls), (plain, plain_calls), (exact_again, exact_again_calls)):
        assert torch.equal(latent_out, reference)
        assert calls == reference_calls


@pytest.mark.parametrize("first_widgets,second_widgets", [
    (NEVER_SKIPS, FORCED),
    (FORCED, NEVER_SKIPS),
    (FORCED, {**FORCED, "max_skip": 1}),
], ids=["exact-then-forced", "forced-then-exact", "forced-then-max-skip-1"])
def test_rfc_applied_twice_runs_as_the_second_node_alone(family, nodes, first_widgets, second_widgets):
    """A second RFC Cache node on an already cached model replaces the first:
    its settings win, and no block is cached twice."""
    latent = family.empty_latent()
    twice = rfc(nodes, rfc(nodes, family.model, **first_widgets), **second_widgets)
    latent_twice, calls_twice = family.ksampler(twice, latent)
    latent_once, calls_once = family.ksampler(rfc(nodes, family.model, **second_widgets), latent)
    assert torch.equal(latent_twice, latent_once)
    assert calls_twice == calls_once


@pytest.mark.parametrize("first_granularity,second_granularity", [("auto", "model"), ("model", "auto")])
def test_rfc_applied_twice_with_another_granularity_runs_as_the_second_node_alone(family, nodes, first_granularity,
                                                                                  second_granularity):
    """Blocks hooked by a first node stay hooked under a whole-model second
    node; they must then only pass through, and the reverse must hook them."""
    widgets = dict(FORCED, estimator="rfe", scheduler="rcs", interval=3)
    latent = family.empty_latent()
    twice = rfc(nodes, rfc(nodes, family.model, granularity=first_granularity, **widgets),
                granularity=second_granularity, **widgets)
    latent_twice, calls_twice = family.ksampler(twice, latent)
    latent_once, calls_once = family.ksampler(rfc(nodes, family.model, granularity=second_granularity, **widgets),
                                              latent)
    _, full_calls = family.ksampler(family.model, latent)
    assert torch.equal(latent_twice, latent_once)
    assert calls_twice == calls_once == full_calls // STEPS * computed_evaluations(STEPS)


class TestWan22ExpertsInterleaved:
    """Wan 2.2's two experts, each behind its own RFC node, with two prompts
    interleaved: both high-noise passes first, then both low-noise passes.
    Each prompt must end as if it ran alone through freshly patched experts."""

    SEEDS = (0, 1)

    @pytest.fixture(scope="class")
    def experts(self, comfy):
        return (build("WAN21_T2V", WAN21_SPEC.unet_config, seed=1),
                build("WAN21_T2V", WAN21_SPEC.unet_config, seed=2))

    @staticmethod
    def blocks(model_patcher):
        return list(model_patcher.model.diffusion_model.blocks)

    def high_pass(self, high, seed):
        start = torch.zeros(1, *WAN21_SPEC.latent_shape)
        return counted(self.blocks(high), lambda: expert_pass(high, start, 0, SWITCH_STEP, seed=seed))

    def low_pass(self, low, switched, seed):
        return counted(self.blocks(low), lambda: expert_pass(low, switched, SWITCH_STEP, 10000, seed=seed))

    def test_interleaved_prompts_match_each_prompt_alone(self, experts, nodes):
        high, low = experts
        patched_high, patched_low = rfc(nodes, high, **FORCED), rfc(nodes, low, **FORCED)
        switched = {seed: self.high_pass(patched_high, seed) for seed in self.SEEDS}
        final = {seed: self.low_pass(patched_low, switched[seed][0], seed) for seed in self.SEEDS}

        for seed in self.SEEDS:
            alone_switched = self.high_pass(rfc(nodes, high, **FORCED), seed)
            alone_final = self.low_pass(rfc(nodes, low, **FORCED), alone_switched[0], seed)
            _, full_low_calls = self.low_pass(low, alone_switched[0], seed)
            assert torch.equal(switched[seed][0], alone_switched[0])
            assert torch.equal(final[seed][0], alone_final[0])
            assert (switched[seed][1], final[seed][1]) == (alone_switched[1], alone_final[1])
            assert final[seed][1] < full_low_calls
        assert not torch.equal(final[0][0], final[1][0])

    def test_each_expert_keeps_its_own_settings(self, experts, nodes):
        """A caching high-noise expert and a never-skipping low-noise one,
        alternated over two prompts: the low-noise passes stay exact."""
        high, low = experts
        patched_high, patched_low = rfc(nodes, high, **FORCED), rfc(nodes, low, **NEVER_SKIPS)
        for seed in self.SEEDS:
            switched, high_calls = self.high_pass(patched_high, seed)
            final, low_calls = self.low_pass(patched_low, switched, seed)
            _, full_high_calls = self.high_pass(high, seed)
            reference, full_low_calls = self.low_pass(low, switched, seed)
            assert high_calls < full_high_calls
            assert torch.equal(final, reference)
            assert low_calls == full_low_calls
