"""target_speedup: the budget, its guards, and the evaluation plan."""

import pytest
import torch

from rfc_core import CacheConfig, RFCRun
from rfc_core.budget import EvaluationPlan, SpeedupScheduler, interpolated_growth

FIRST = ("block", 0)


def flow_sigmas(steps: int) -> list[float]:
    return [1.0 - i / steps for i in range(steps + 1)]


def trajectory(sigma: float, roughness: float = 1.0) -> torch.Tensor:
    """A first-block input whose forecast error varies along the run: fast
    changes near both ends, calm in the middle, as in flow models."""
    t = torch.linspace(0, 1, 64)
    return (torch.sin(6 * t + 4 * sigma) + roughness * torch.cos(20 * t * (sigma - 0.5) ** 2)).unsqueeze(0)


def sample(config: CacheConfig, sigmas: list[float], evaluation_sigmas=None, roughness: float = 1.0) -> RFCRun:
    run = RFCRun(config, FIRST, schedule=sigmas)
    for sigma in evaluation_sigmas or sigmas[:-1]:
        run.start_evaluation(sigma)
        module_input = trajectory(sigma, roughness)
        if run.predict("chunk", FIRST, module_input) is None:
            run.record("chunk", FIRST, module_input, module_input * 0.5)
    return run


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 3.5])
def test_a_run_ends_at_its_budget(steps, target):
    run = sample(CacheConfig(target_speedup=target, max_skip=3), flow_sigmas(steps))
    assert run.computed_evaluations == round(steps / target)
    assert abs(run.speedup / target - 1) <= 0.1


@pytest.mark.parametrize("roughness", [0.0, 1e3])
def test_the_guards_hold_the_budget_whatever_the_error(roughness):
    # roughness 0 gives a smooth input the forecast gets almost exactly (the
    # threshold is never passed); 1e3 one whose error passes it every time.
    run = sample(CacheConfig(target_speedup=2.5, max_skip=3), flow_sigmas(30), roughness=roughness)
    assert run.computed_evaluations == 12
    reasons = {e.reason for e in run.evaluations}
    assert "warm-up" in reasons


def test_full_computations_go_where_the_accumulated_error_is_largest():
    run = sample(CacheConfig(target_speedup=2.5, max_skip=3), flow_sigmas(50))
    decided = [e for e in run.evaluations if e.reason == "threshold"]
    assert decided, "the threshold should decide most evaluations"
    for e in decided:
        assert e.computed == (e.accumulated > e.threshold)
    computed_errors = [e.accumulated for e in decided if e.computed]
    skipped_errors = [e.accumulated for e in decided if not e.computed]
    assert sum(computed_errors) / len(computed_errors) > 2 * sum(skipped_errors) / len(skipped_errors)


@pytest.mark.parametrize("full_count, spacing", [
    # 10 evaluations and 3 full computations left: on budget, S - 1/2 sets the threshold.
    (7, 2.5),
    # 10 evaluations and 6 left: behind budget, the threshold paces the
    # surplus over the rest of the run rather than leaving it to the end.
    (4, 10 / 6),
])
def test_the_threshold_follows_the_budget_left_once_the_run_falls_behind(full_count, spacing):
    sigmas = flow_sigmas(30)
    plan = EvaluationPlan(sigmas)
    for sigma in sigmas[:21]:
        plan.observe(sigma)
    scheduler = SpeedupScheduler(3.0, order=1, plan=plan, fewest_full=lambda future, cached: 0, warmup=2)
    assert scheduler.budget == 10 and len(plan.future()) == 9
    scheduler.wants_full(0.5, full_count, cached_in_row=0)
    # One decision one evaluation after a full computation: the mean rate is its error.
    assert scheduler.threshold == pytest.approx(0.5 * interpolated_growth(spacing, scheduler.exponent))


def test_a_sampler_with_two_evaluations_per_step_gets_its_budget_from_both():
    sigmas = flow_sigmas(20)
    # Heun: each step evaluates at sigma_i and sigma_{i+1}; the last step is Euler.
    evaluation_sigmas = [s for i in range(19) for s in (sigmas[i], sigmas[i + 1])] + [sigmas[19]]
    run = sample(CacheConfig(target_speedup=2.5, max_skip=3), sigmas, evaluation_sigmas)
    assert len(run.evaluations) == 39
    assert abs(run.speedup / 2.5 - 1) <= 0.1


def test_the_plan_counts_evaluations_per_step():
    plan = EvaluationPlan([1.0, 0.75, 0.5, 0.25, 0.0])
    plan.observe(1.0)
    assert plan.future() == [0.75, 0.5, 0.25] and plan.total == 4
    plan.observe(0.75)
    plan.observe(0.75)
    # Three evaluations over two steps reached: 1.5 per step from here on.
    assert plan.future() == [0.5, 0.5, 0.25]
    assert plan.total == 6


def test_a_target_without_a_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        RFCRun(CacheConfig(target_speedup=2.0), FIRST)


@pytest.mark.parametrize("widgets, message", [
    (dict(target_speedup=0.5), "'target_speedup' must be 0 .* or between 1 and 20"),
    (dict(target_speedup=21.0), "'target_speedup' must be between 0.0 and 20.0"),
    (dict(target_speedup=5.0, max_skip=3), "'target_speedup' 5.0 needs 'max_skip' of at least 4"),
    (dict(target_speedup=2.0, scheduler="fixed"), "'target_speedup' works with the rcs scheduler only"),
])
def test_bad_targets_name_the_widget_and_the_range(widgets, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**widgets)


def test_target_one_never_skips():
    config = CacheConfig(target_speedup=1.0)
    assert not config.skipping_enabled


def test_best_speedup_counts_warmup_and_max_skip():
    run = RFCRun(CacheConfig(target_speedup=2.0, max_skip=3), FIRST, schedule=flow_sigmas(20))
    # 1 warm-up, then 19 evaluations: 3 skipped and 1 computed, four times, and 3 skipped.
    assert run.best_speedup() == pytest.approx(20 / (1 + 4))


def test_the_step_table_has_a_line_per_evaluation_with_its_reason():
    run = sample(CacheConfig(target_speedup=2.5, max_skip=3), flow_sigmas(20))
    lines = run.step_table().splitlines()
    assert len(lines) == 1 + 20
    assert "warm-up" in lines[1] and "warm-up" not in lines[2]
    assert all(line.split()[2] in ("yes", "no") for line in lines[1:])
