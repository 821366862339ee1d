import pytest
import torch

from rfc_core import CacheConfig, RelationalScheduler, RFCRun

FIRST = ("block", 0)


def drive(run, sigmas, inputs, modules=(FIRST, ("block", 1))):
    """Run a fake model: every module's residual is its input times 2.
    Returns per evaluation whether it was computed, and the number of real module calls."""
    real_calls = 0
    computed = []
    for sigma, module_input in zip(sigmas, inputs):
        run.start_evaluation(sigma)
        for key in modules:
            if run.predict("chunk", key, module_input) is None:
                real_calls += 1
                run.record("chunk", key, module_input, module_input * 2)
        computed.append(run.current.computed)
    return computed, real_calls


def test_rcs_triggers_exactly_when_accumulated_error_passes_threshold():
    scheduler = RelationalScheduler(threshold=0.5)
    assert scheduler.wants_full(0.25, 2, 0) == (False, "threshold")
    assert scheduler.wants_full(0.25, 2, 1) == (False, "threshold")  # 0.5 is not above 0.5
    assert scheduler.wants_full(0.0001, 2, 2) == (True, "threshold")
    scheduler.on_full()
    assert scheduler.accumulated == 0.0


def test_run_skips_until_the_input_forecast_error_accumulates():
    # order 0: the forecast is the last computed input, so the relative L1
    # error of input 1 + k*0.1 against 1.0 is exactly k*0.1/(1+k*0.1).
    config = CacheConfig(threshold=0.25, max_skip=10, order=0, estimator="reuse")
    run = RFCRun(config, first_module=FIRST)
    values = [1.0, 1.1, 1.2, 1.3]
    computed, _ = drive(run, [1.0, 0.9, 0.8, 0.7], [torch.full((1, 4), v) for v in values])
    errors = [e.forecast_error for e in run.evaluations]
    assert errors[0] is None
    assert errors[1] == pytest.approx(0.1 / 1.1)
    assert errors[2] == pytest.approx(0.2 / 1.2)  # accumulated 0.0909 + 0.1667 = 0.2576 > 0.25
    assert computed == [True, False, True, False]


@pytest.mark.parametrize("max_skip", [1, 2, 3])
def test_max_skip_caps_consecutive_predictions(max_skip):
    config = CacheConfig(threshold=10.0, max_skip=max_skip, order=1)
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1 - i / 20 for i in range(20)]
    computed, _ = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    longest = run_length = 0
    for c in computed:
        run_length = 0 if c else run_length + 1
        longest = max(longest, run_length)
    assert longest == max_skip
    assert computed[:2] == [True, False]  # RCS warms up on one full computation


@pytest.mark.parametrize("order", [0, 1, 2])
def test_rcs_warms_up_on_one_full_computation(order):
    config = CacheConfig(threshold=10.0, max_skip=5, order=order)
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1 - i / 10 for i in range(8)]
    computed, _ = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    assert computed[:2] == [True, False]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_a_fixed_schedule_warms_up_on_order_plus_one_full_computations(order):
    config = CacheConfig(scheduler="fixed", interval=8, max_skip=7, order=order)
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1 - i / 10 for i in range(8)]
    computed, _ = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    assert computed[: order + 1] == [True] * (order + 1)
    assert computed[order + 1] is False


@pytest.mark.parametrize("config", [
    CacheConfig(threshold=0.0, max_skip=3),
    CacheConfig(threshold=10.0, max_skip=0),
    CacheConfig(scheduler="fixed", interval=1),
])
def test_zero_settings_never_skip(config):
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1 - i / 10 for i in range(10)]
    computed, calls = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    assert all(computed)
    assert calls == 20


def test_fixed_interval_counts_real_module_calls():
    config = CacheConfig(scheduler="fixed", interval=3, max_skip=10, estimator="taylor", order=1)
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1 - i / 12 for i in range(12)]
    computed, calls = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    assert computed == [True, True, False, False, True, False, False, True, False, False, True, False]
    assert calls == 2 * sum(computed)
    assert run.modules_predicted == 2 * (12 - sum(computed))


def test_skip_window_forces_full_computation_outside_it():
    config = CacheConfig(threshold=10.0, max_skip=10, order=0)
    run = RFCRun(config, first_module=FIRST, skip_window=(0.75, 0.35))
    sigmas = [1 - i / 10 for i in range(10)]
    computed, _ = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    for sigma, c in zip(sigmas, computed):
        if not 0.35 < sigma <= 0.75:
            assert c, sigma
    assert not all(computed)


def test_prediction_follows_the_deciding_chunk_and_a_new_chunk_computes():
    config = CacheConfig(threshold=10.0, max_skip=10, order=0)
    run = RFCRun(config, first_module=FIRST)
    x = torch.ones(1, 4)
    run.start_evaluation(1.0)
    for chunk in ("uncond", "cond"):
        assert run.predict(chunk, FIRST, x) is None
        run.record(chunk, FIRST, x, x)
    run.start_evaluation(0.9)
    assert run.predict("uncond", FIRST, x) is not None
    assert run.predict("cond", FIRST, x) is not None
    assert run.predict("a chunk never seen", FIRST, x) is None


def test_finish_releases_every_cached_tensor_and_a_new_run_starts_clean():
    config = CacheConfig(threshold=10.0, max_skip=2, order=2)
    sigmas = [1 - i / 10 for i in range(10)]
    inputs = [torch.full((1, 4), 1 + s) for s in sigmas]
    first = RFCRun(config, first_module=FIRST)
    first_result = drive(first, sigmas, inputs)
    assert first.cache_bytes() > 0
    first.finish()
    assert first.cache_bytes() == 0 and first.peak_bytes > 0
    second = RFCRun(config, first_module=FIRST)
    assert drive(second, sigmas, inputs) == first_result


@pytest.mark.parametrize("widget,kwargs", [
    ("threshold", {"threshold": -0.1}),
    ("max_skip", {"max_skip": 51}),
    ("order", {"order": 3}),
    ("interval", {"interval": 0}),
    ("start_percent", {"start_percent": 1.5}),
])
def test_out_of_range_values_name_the_widget_and_range(widget, kwargs):
    with pytest.raises(ValueError, match=rf"'{widget}' must be between"):
        CacheConfig(**kwargs)


def test_bad_choice_and_window_order_are_rejected():
    with pytest.raises(ValueError, match="'estimator' must be one of"):
        CacheConfig(estimator="magic")
    with pytest.raises(ValueError, match="'start_percent'"):
        CacheConfig(start_percent=0.6, end_percent=0.5)


def test_module_inputs_are_only_requested_where_they_are_read():
    rfc = RFCRun(CacheConfig(), first_module=FIRST)
    assert rfc.needs_module_input(FIRST) and rfc.needs_module_input(("block", 1))
    taylor_rcs = RFCRun(CacheConfig(estimator="taylor"), first_module=FIRST)
    assert taylor_rcs.needs_module_input(FIRST) and not taylor_rcs.needs_module_input(("block", 1))
    fora = RFCRun(CacheConfig(estimator="reuse", scheduler="fixed"), first_module=FIRST)
    assert not fora.needs_module_input(FIRST)


def _forced_run(schedule):
    run = RFCRun(CacheConfig(threshold=10.0, max_skip=3, order=1), first_module=FIRST, schedule=schedule)
    sigmas = schedule[:-1]
    computed, _ = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas])
    return run, computed


def test_a_short_run_that_ends_the_image_computes_its_last_step():
    # 8 steps to sigma 0: forced caching would predict the last three.
    schedule = [1 - i / 8 for i in range(9)]
    run, computed = _forced_run(schedule)
    assert computed == [True, False, False, False, True, False, False, True]
    assert run.evaluations[-1].reason == "last step of a short run"


@pytest.mark.parametrize("schedule", [
    [1 - i / 12 for i in range(13)],  # 12 steps: long enough to forecast its end
    [1 - i / 16 for i in range(9)],  # a first stage that hands on a noisy latent
])
def test_long_runs_and_first_stages_may_predict_their_last_step(schedule):
    _, computed = _forced_run(schedule)
    assert computed[-1] is False


def test_the_target_that_a_whole_number_of_steps_cannot_meet_is_said():
    schedule = [1 - i / 4 for i in range(5)]
    run = RFCRun(CacheConfig(target_speedup=1.5, max_skip=3), first_module=FIRST, schedule=schedule)
    assert run.rounded_target() == "3 of 4 steps computed is 1.33x, the nearest a whole number of steps gives"
    assert "target 1.5x: 3 of 4 steps computed is 1.33x" in run.summary()
    even = RFCRun(CacheConfig(target_speedup=2.0, max_skip=3), first_module=FIRST, schedule=schedule)
    assert even.rounded_target() == ""


def test_a_predicted_evaluation_that_computed_blocks_counts_as_computed():
    """A conditioning new to the run has nothing to predict from: its
    blocks are computed though the evaluation was decided predicted."""
    run = RFCRun(CacheConfig(threshold=10.0, max_skip=3, order=1), first_module=FIRST)
    for number, sigma in enumerate((1.0, 0.9)):
        run.start_evaluation(sigma)
        for chunk in ("cond",) if number == 0 else ("cond", "new cond"):
            value = torch.full((1, 4), 1 + sigma)
            if run.predict(chunk, FIRST, value) is None:
                run.record(chunk, FIRST, value, value * 2)
    second = run.evaluations[1]
    assert second.computed is False and second.predicted_modules == 1 and second.computed_modules == 1
    assert second.counts_as_computed
    assert run.computed_evaluations == 2
    assert "blocks with nothing to predict from were computed" in second.reason
    assert run.summary().startswith("computed 2 of 2 model evaluations")


def test_a_run_the_threshold_let_predict_nothing_says_so_with_its_errors():
    config = CacheConfig(threshold=0.1, max_skip=3, order=1)
    generator = torch.Generator().manual_seed(0)
    sigmas = [1 - i / 20 for i in range(20)]
    noisy = RFCRun(config, first_module=FIRST)
    # Fresh noise every step, as an ancestral sampler adds: nothing forecasts it.
    computed, _ = drive(noisy, sigmas, [torch.randn((1, 64), generator=generator) for _ in sigmas])
    assert all(computed)
    reason = noisy.why_nothing_was_predicted()
    assert reason.startswith("nothing was predicted: the forecast error passed the threshold 0.1 at every step (median ")
    smooth = RFCRun(config, first_module=FIRST)
    drive(smooth, sigmas, [torch.full((1, 64), 1 + s) for s in sigmas])
    assert smooth.computed_evaluations < 20 and smooth.why_nothing_was_predicted() is None


def test_a_computed_head_runs_in_predicted_evaluations_and_only_the_rest_is_predicted():
    """computed_head: the head blocks run in every evaluation; a predicted
    evaluation forecasts the blocks after them, and still counts as predicted."""
    modules = [("block", index) for index in range(6)]
    config = CacheConfig(threshold=10.0, max_skip=1, order=1, computed_head=1 / 3)
    run = RFCRun(config, first_module=modules[0], head_blocks=frozenset(modules[:2]))
    sigmas = [1 - i / 8 for i in range(8)]
    computed, real_calls = drive(run, sigmas, [torch.full((1, 4), 1 + s) for s in sigmas], modules)
    assert computed == [True, False, True, False, True, False, True, False]
    assert real_calls == 4 * 6 + 4 * 2
    assert [e.head_modules for e in run.evaluations] == [0, 2] * 4
    assert run.computed_evaluations == 4 and run.modules_predicted == 4 * 4
    assert "(8 of them in the head that predicted evaluations compute: 67% of the block calls)" in run.summary()


def test_computed_head_is_a_share_of_the_blocks():
    with pytest.raises(ValueError, match="'computed_head' must be between 0.0 and 1.0"):
        CacheConfig(computed_head=1.5)
    assert "first 33% of blocks always computed" in CacheConfig(computed_head=1 / 3).describe()
