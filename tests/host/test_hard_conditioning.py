"""Conditioning against RFC, on Flux, Wan and Lumina 2 (an object-patched
family): cfg 1 and above, batches of 1 to 4, cond and uncond run as separate
chunks, area conditionings (each its own chunk, since its latent crop has
its own shape) and conditionings limited to part of the schedule, so that
chunks appear and disappear mid-run.

Every evaluation's model calls are logged from outside the pack (see
test_hard_samplers.ExecutionLog), so each chunk's computed or predicted
blocks are checked one by one.
"""

from __future__ import annotations

import pytest
import torch

from family_harness import FORCED, rfc
from test_hard_samplers import SPECS, THRESHOLD_ZERO, counted_modules, family_models, forced_plan, run_logged

STEPS = 6
# The evaluation at which a conditioning limited by start_percent appears:
# the 4th, which forced caching predicts (computed, computed, predicted,
# predicted, computed, predicted).
APPEARS_AT = 3


@pytest.fixture(scope="module")
def models(comfy):
    return family_models()


def prompt(spec, batch, seed, **extras):
    """One conditioning of the family's own kind, with ComfyUI extras such as
    `area` (height, width, y, x in latent pixels), `strength`,
    `start_percent` and `end_percent`."""
    [[cross, own_extras]] = spec.conditioning(batch, seed)
    return [cross, {**own_extras, **extras}]


def area(spec, top, left, height, width):
    """An area in fractions of the latent, as (height, width, y, x)."""
    latent_height, latent_width = spec.latent_shape[-2:]
    return (int(height * latent_height), int(width * latent_width), int(top * latent_height),
            int(left * latent_width))


def crop(spec, region):
    """The spatial shape of a model call that runs an area's crop."""
    return (*spec.latent_shape[1:-2], region[0], region[1])


def upper_half(spec):
    return area(spec, 0.0, 0.0, 0.5, 1.0)


def lower_half(spec):
    return area(spec, 0.5, 0.0, 0.5, 1.0)


def right_part(spec):
    return area(spec, 0.25, 0.5, 0.75, 0.5)


def schedule_sigmas(model, steps=STEPS) -> list[float]:
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps, "cpu", "euler", "simple").sigmas.tolist()


def start_percent_for(model, index: int) -> float:
    """A start_percent that makes a conditioning first active at evaluation
    `index` of the euler schedule."""
    sigmas = schedule_sigmas(model)
    model_sampling = model.get_model_object("model_sampling")
    for hundredth in range(1, 100):
        sigma = float(model_sampling.percent_to_sigma(hundredth / 100))
        if sigmas[index] <= sigma < sigmas[index - 1]:
            return hundredth / 100
    raise AssertionError(f"no start_percent lands on evaluation {index} of {sigmas}")


def end_percent_for(model, index: int) -> float:
    """An end_percent that keeps a conditioning active up to and including
    evaluation `index` of the euler schedule."""
    sigmas = schedule_sigmas(model)
    model_sampling = model.get_model_object("model_sampling")
    for hundredth in range(1, 100):
        sigma = float(model_sampling.percent_to_sigma(hundredth / 100))
        if sigmas[index + 1] < sigma <= sigmas[index]:
            return hundredth / 100
    raise AssertionError(f"no end_percent ends on evaluation {index} of {sigmas}")


def two_areas(spec, model, batch):
    """Two prompts on areas of different sizes: each runs as its own chunk."""
    return [prompt(spec, batch, 1, area=upper_half(spec), strength=1.0),
            prompt(spec, batch, 3, area=right_part(spec), strength=0.7)]


def ranged(spec, model, batch, late_first=False):
    """A whole-image prompt for the whole run, an area prompt that ends after
    the third evaluation and an area prompt that starts at the fourth, so
    evaluations run two or three chunks. With `late_first` the late prompt
    comes first in the list, and ComfyUI runs its chunk first."""
    early = prompt(spec, batch, 4, area=upper_half(spec), end_percent=end_percent_for(model, 2))
    late = prompt(spec, batch, 3, area=right_part(spec), strength=0.7,
                  start_percent=start_percent_for(model, APPEARS_AT))
    whole = prompt(spec, batch, 1)
    return [late, whole, early] if late_first else [whole, early, late]


def run(spec, model, patcher, nodes, positive=None, cfg=3.0, batch=1):
    return run_logged(spec, model, patcher, nodes, steps=STEPS, cfg=cfg, batch=batch,
                      positive=positive, negative=[prompt(spec, batch, 2)])


def split_chunks(model, monkeypatch):
    """Make ComfyUI believe no two chunks fit in memory together, as it does
    on a small GPU: every conditioning then runs as its own model call."""
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))


def call_flags(log) -> list[list[bool]]:
    """Per evaluation, per model call: whether it executed its blocks (all or
    none of them: see assert_whole_calls)."""
    flags = []
    for evaluation in log.evaluations:
        flags.append([call.blocks > 0 for call in evaluation.calls])
    return flags


def assert_whole_calls(log, blocks: int):
    for index, evaluation in enumerate(log.evaluations):
        for call in evaluation.calls:
            assert call.blocks in (0, blocks), (index, call)


def check_exact_and_finite(spec, model, nodes, **run_kwargs):
    """Unpatched, threshold 0 and forced runs; returns them after the checks
    every case shares."""
    reference, reference_log = run(spec, model, model, nodes, **run_kwargs)
    assert torch.isfinite(reference).all()
    exact, exact_log = run(spec, model, rfc(nodes, model, **THRESHOLD_ZERO), nodes, **run_kwargs)
    assert torch.equal(exact, reference)
    assert exact_log.blocks == reference_log.blocks
    latent, log = run(spec, model, rfc(nodes, model, **FORCED), nodes, **run_kwargs)
    assert latent.shape == reference.shape
    assert torch.isfinite(latent).all()
    assert [len(e.calls) for e in log.evaluations] == [len(e.calls) for e in reference_log.evaluations]
    assert log.blocks < reference_log.blocks
    assert_whole_calls(log, len(counted_modules(spec, model, nodes)))
    return reference_log, log


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize("cfg,batch", [(1.0, 1), (1.0, 3), (3.0, 2), (3.0, 4)])
def test_cfg_and_batch(models, nodes, family, cfg, batch):
    spec, model = SPECS[family], models(family)
    reference_log, log = check_exact_and_finite(spec, model, nodes, cfg=cfg, batch=batch)
    # cfg 1 runs the positive prompt alone, above 1 batched with the negative
    assert all(len(e.calls) == 1 for e in reference_log.evaluations)
    assert all(e.calls[0].shape[0] == (batch if cfg == 1.0 else 2 * batch) for e in reference_log.evaluations)
    assert log.computed(reference_log) == forced_plan(reference_log.sigmas, schedule_sigmas(model))


@pytest.mark.parametrize("family", sorted(SPECS))
def test_area_prompts_each_run_as_a_chunk_and_follow_the_decision(models, nodes, family):
    """ComfyUI gives each area prompt a copy of the negative on the same area
    and batches the two: one chunk per area, one for the whole negative."""
    spec, model = SPECS[family], models(family)
    reference_log, log = check_exact_and_finite(spec, model, nodes, positive=two_areas(spec, model, 1))
    shapes = sorted(call.shape[2:] for call in reference_log.evaluations[0].calls)
    assert shapes == sorted([crop(spec, upper_half(spec)), crop(spec, right_part(spec)), spec.latent_shape[1:]])
    plan = forced_plan(reference_log.sigmas, schedule_sigmas(model))
    assert call_flags(log) == [[computed] * 3 for computed in plan]


@pytest.mark.parametrize("family", sorted(SPECS))
def test_a_prompt_that_appears_mid_run_computes_before_it_is_predicted(models, nodes, family):
    """The late prompt's chunk first runs at an evaluation the other chunks
    predict. With nothing cached for it, it must compute every block there;
    from then on it follows the run's decisions."""
    spec, model = SPECS[family], models(family)
    reference_log, log = check_exact_and_finite(spec, model, nodes, positive=ranged(spec, model, 1))
    late_shape = crop(spec, right_part(spec))
    early_shape = crop(spec, upper_half(spec))
    chunk_shapes = [[call.shape[2:] for call in e.calls] for e in reference_log.evaluations]
    assert [late_shape in shapes for shapes in chunk_shapes] == [i >= APPEARS_AT for i in range(STEPS)]
    assert [early_shape in shapes for shapes in chunk_shapes] == [i <= 2 for i in range(STEPS)]

    plan = forced_plan(reference_log.sigmas, schedule_sigmas(model))
    assert plan == [True, False, False, True, False, True]  # a short run computes its last step
    for index, evaluation in enumerate(log.evaluations):
        for call in evaluation.calls:
            first_seen = call.shape[2:] == late_shape and index == APPEARS_AT
            assert (call.blocks > 0) == (plan[index] or first_seen), (index, call)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_a_prompt_that_appears_mid_run_and_runs_first_computes_the_evaluation(models, nodes, family):
    """When the new chunk is the first to reach the first block, the decision
    is its own: with no history it computes, and like the start of a run it
    may be predicted from that one point on."""
    spec, model = SPECS[family], models(family)
    reference_log, log = check_exact_and_finite(spec, model, nodes,
                                                positive=ranged(spec, model, 1, late_first=True))
    late_shape = crop(spec, right_part(spec))
    assert reference_log.evaluations[APPEARS_AT].calls[0].shape[2:] == late_shape
    computed = [True, False, False, True, False, True]  # a short run computes its last step
    assert call_flags(log) == [[flag] * len(e.calls) for flag, e in zip(computed, reference_log.evaluations)]


POSITIVES = {
    "one prompt": None,
    "two area prompts": two_areas,
    "ranged prompts": ranged,
}


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize("positive", sorted(POSITIVES))
def test_split_chunks_share_each_decision(models, nodes, family, positive, monkeypatch):
    """Batched or one conditioning per model call, the same evaluations are
    computed and the result is the same up to batching round-off."""
    spec, model = SPECS[family], models(family)
    make = POSITIVES[positive]
    conditioning = None if make is None else make(spec, model, 1)
    batched, batched_log = run(spec, model, rfc(nodes, model, **FORCED), nodes, positive=conditioning)

    split_chunks(model, monkeypatch)
    reference, reference_log = run(spec, model, model, nodes, positive=conditioning)
    split, split_log = run(spec, model, rfc(nodes, model, **FORCED), nodes, positive=conditioning)
    assert all(call.shape[0] == 1 for e in reference_log.evaluations for call in e.calls)
    assert torch.isfinite(split).all()
    assert split_log.blocks < reference_log.blocks
    assert_whole_calls(split_log, len(counted_modules(spec, model, nodes)))
    assert [any(flags) for flags in call_flags(split_log)] == [any(flags) for flags in call_flags(batched_log)]
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_split_area_prompts_of_one_size_keep_their_own_features(models, nodes, family, monkeypatch):
    """Two areas of the same size batch into one chunk, or run as two when
    memory is short; the two must not be cached as one."""
    spec, model = SPECS[family], models(family)
    positive = [prompt(spec, 1, 1, area=upper_half(spec)), prompt(spec, 1, 3, area=lower_half(spec))]
    batched, _ = run(spec, model, rfc(nodes, model, **FORCED), nodes, positive=positive)
    split_chunks(model, monkeypatch)
    split, split_log = run(spec, model, rfc(nodes, model, **FORCED), nodes, positive=positive)
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_a_prompt_that_takes_over_mid_run_computes_before_it_is_predicted(models, nodes, family):
    """cfg 1, one prompt up to the third evaluation and another from the
    fourth (a prompt schedule): the second one's first evaluation has nothing
    cached for it, and must compute rather than predict the first prompt's
    features."""
    spec, model = SPECS[family], models(family)
    positive = [prompt(spec, 1, 1, end_percent=end_percent_for(model, APPEARS_AT - 1)),
                prompt(spec, 1, 3, start_percent=start_percent_for(model, APPEARS_AT))]
    reference, reference_log = run(spec, model, model, nodes, positive=positive, cfg=1.0)
    assert all(len(e.calls) == 1 for e in reference_log.evaluations)
    latent, log = run(spec, model, rfc(nodes, model, **FORCED), nodes, positive=positive, cfg=1.0)
    assert torch.isfinite(latent).all()
    assert log.evaluations[APPEARS_AT].blocks == reference_log.evaluations[APPEARS_AT].blocks
