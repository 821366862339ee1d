"""Sigma sequences that samplers and hand-made sigma lists really produce:
repeats (heun, zero-length steps), returns to an earlier sigma (restarts),
and evaluations at sigma 0."""

import pytest
import torch

from rfc_core import CacheConfig, FeatureHistory, RFCRun, TaylorEstimator

FIRST = ("block", 0)


def quadratic(sigma, base):
    return base[0] + base[1] * sigma + base[2] * sigma**2


def drive(run, sigmas, value=lambda sigma: torch.full((1, 4), 1.0 + sigma)):
    """A fake model of two modules whose input is `value(sigma)` and whose
    residual is twice the input. Per evaluation: computed, and what the
    second module returned (predicted or computed)."""
    computed, outputs = [], []
    for sigma in sigmas:
        run.start_evaluation(sigma)
        module_input = value(sigma)
        for key in (FIRST, ("block", 1)):
            residual = run.predict("chunk", key, module_input)
            if residual is None:
                residual = module_input * 2
                run.record("chunk", key, module_input, residual)
        computed.append(run.current.computed)
        outputs.append(residual)
    return computed, outputs


def test_returning_to_an_older_sigma_keeps_the_forecast_finite_and_exact():
    """order 2 holds 1.0, 0.8, 0.6; noise added back to 0.8 must not divide
    by the zero gap to the older 0.8. That point and the one before it go;
    the two left forecast a straight line exactly, and one more point makes
    the quadratic exact again."""
    base = torch.randn(3, 1, 5, dtype=torch.float64)
    history = FeatureHistory(2)
    for sigma in (1.0, 0.8, 0.6):
        history.push(sigma, [quadratic(sigma, base)])
    history.push(0.8, [quadratic(0.8, base)])
    assert history.nodes == [0.8, 0.6]
    assert all(torch.isfinite(history.values[0][:, slot]).all() for slot in history.slots)
    slope = (quadratic(0.8, base) - quadratic(0.6, base)) / (0.8 - 0.6)
    torch.testing.assert_close(history.forecast(0.3)[0], quadratic(0.6, base) + slope * (0.3 - 0.6))
    history.push(0.3, [quadratic(0.3, base)])
    assert len(history) == 3
    torch.testing.assert_close(history.forecast(0.1)[0], quadratic(0.1, base))


def test_forecast_at_the_newest_sigma_is_the_newest_value():
    """heun's second evaluation at a sigma is predicted from the first one
    computed there: no extrapolation at all."""
    estimator = TaylorEstimator(2)
    for sigma, value in ((1.0, 3.0), (0.7, 2.0), (0.5, 1.5)):
        estimator.update(sigma, torch.full((2, 3), value), None)
    torch.testing.assert_close(estimator.predict(0.5, None), torch.full((2, 3), 1.5))


def test_sigma_zero_is_a_point_like_any_other():
    base = torch.randn(3, 1, 4, dtype=torch.float64)
    history = FeatureHistory(2)
    for sigma in (0.5, 0.2, 0.0, 0.0):
        history.push(sigma, [quadratic(sigma, base)])
    assert history.nodes == [0.0, 0.2, 0.5]
    torch.testing.assert_close(history.forecast(0.0)[0], quadratic(0.0, base))
    torch.testing.assert_close(history.forecast(0.1)[0], quadratic(0.1, base))


def test_a_repeated_sigma_is_one_point():
    """RCS warms up on one point; the second evaluation at sigma 1.0 adds
    none, so the order-1 forecast stays reuse until a second sigma is
    computed, and then follows the line through both exactly."""
    run = RFCRun(CacheConfig(threshold=10.0, max_skip=2, order=1), first_module=FIRST)
    sigmas = [1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    computed, outputs = drive(run, sigmas)
    assert computed == [True, False, False, True, False, False]
    torch.testing.assert_close(outputs[2], torch.full((1, 4), 2 * (1.0 + 1.0)))
    for sigma, output in list(zip(sigmas, outputs))[3:]:
        torch.testing.assert_close(output, torch.full((1, 4), 2 * (1.0 + sigma)))


def test_repeated_sigmas_after_warmup_follow_the_usual_pattern():
    run = RFCRun(CacheConfig(threshold=10.0, max_skip=2, order=1), first_module=FIRST)
    computed, outputs = drive(run, [1.0, 0.9, 0.9, 0.7, 0.7, 0.7, 0.4])
    assert computed == [True, False, False, True, False, False, True]
    assert all(torch.isfinite(output).all() for output in outputs)


@pytest.mark.parametrize("scheduler", ["rcs", "fixed"])
def test_restart_to_an_older_sigma_never_predicts_inf_or_nan(scheduler):
    """order 2, the fixed interval predicting right after the restart: the
    prediction is built from the points left and is finite (and, for this
    module linear in sigma, exact wherever two points are left: RCS's second
    evaluation has one, and reuses it)."""
    config = CacheConfig(threshold=10.0, max_skip=1, order=2, scheduler=scheduler, interval=2,
                         estimator="taylor" if scheduler == "fixed" else "rfe")
    run = RFCRun(config, first_module=FIRST)
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.8, 0.3, 0.2]
    computed, outputs = drive(run, sigmas)
    expected = {"rcs": [True, False, True, False, True, False, True],
                "fixed": [True, True, True, False, True, False, True]}[scheduler]
    assert computed == expected
    one_point = {"rcs": {1: 1.0}, "fixed": {}}[scheduler]
    for number, (sigma, output) in enumerate(zip(sigmas, outputs)):
        exact = one_point.get(number, sigma)
        torch.testing.assert_close(output, torch.full((1, 4), 2 * (1.0 + exact)))


def test_evaluations_at_sigma_zero_are_computed():
    """The skip window of a flow model is (0, 1]: the evaluation a sampler
    makes at sigma 0 on a trailing double zero is always computed."""
    run = RFCRun(CacheConfig(threshold=10.0, max_skip=2, order=1), first_module=FIRST, skip_window=(1.0, 0.0))
    computed, _ = drive(run, [1.0, 0.8, 0.6, 0.0, 0.0])
    assert computed == [True, False, False, True, True]
