import pytest
import torch

from rfc_core import FeatureHistory, RelationalEstimator, ReuseEstimator, TaylorEstimator

SIGMAS = [1.0, 0.93, 0.71, 0.66, 0.4]  # deliberately uneven spacing


def polynomial(sigma, degree, base):
    return sum(base[i] * sigma**i for i in range(degree + 1))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_reproduces_polynomial_of_its_order_at_uneven_spacing(order):
    base = torch.randn(order + 1, 3, 5, dtype=torch.float64)
    estimator = TaylorEstimator(order)
    for sigma in SIGMAS[: order + 1]:
        estimator.update(sigma, polynomial(sigma, order, base), None)
    target = 0.25
    torch.testing.assert_close(estimator.predict(target, None), polynomial(target, order, base))


def test_taylor_of_lower_order_misses_a_higher_degree_trajectory():
    base = torch.randn(3, 3, 5, dtype=torch.float64)
    estimator = TaylorEstimator(1)
    for sigma in SIGMAS[:3]:
        estimator.update(sigma, polynomial(sigma, 2, base), None)
    error = (estimator.predict(0.25, None) - polynomial(0.25, 2, base)).abs().max()
    assert error > 1e-3


def test_reuse_returns_the_last_output():
    estimator = ReuseEstimator()
    estimator.update(1.0, torch.ones(2, 4), None)
    estimator.update(0.8, torch.full((2, 4), 3.0), None)
    torch.testing.assert_close(estimator.predict(0.1, None), torch.full((2, 4), 3.0))


def test_repeated_sigma_replaces_the_newest_point():
    base = torch.randn(3, 2, 4, dtype=torch.float64)
    history = FeatureHistory(2)
    history.push(1.0, [polynomial(1.0, 2, base)])
    history.push(0.8, [torch.zeros(2, 4, dtype=torch.float64)])  # replaced by the next push
    history.push(0.8, [polynomial(0.8, 2, base)])
    history.push(0.5, [polynomial(0.5, 2, base)])
    assert len(history) == 3
    torch.testing.assert_close(history.forecast(0.2)[0], polynomial(0.2, 2, base))


def linear_module_run(estimator_cls, order, target=0.2):
    """A linear module whose input moves along one direction with irregular
    step sizes: the output change is proportional to the input change."""
    torch.manual_seed(0)
    weight = torch.randn(6, 6, dtype=torch.float64)
    origin = torch.randn(2, 6, dtype=torch.float64)
    direction = torch.randn(2, 6, dtype=torch.float64)

    def position(sigma):  # irregular in sigma: far from any low-degree polynomial
        return torch.tensor([[sigma ** 3 + 0.3 * torch.sin(torch.tensor(9 * sigma)).item()],
                             [2 * sigma ** 4]], dtype=torch.float64)

    def module_input(sigma):
        return origin + position(sigma) * direction

    def module_output(sigma):
        return module_input(sigma) @ weight.T

    estimator = estimator_cls(order)
    for sigma in (1.0, 0.9, 0.75)[: order + 1]:
        estimator.update(sigma, module_output(sigma), module_input(sigma))
    return estimator.predict(target, module_input(target)), module_output(target)


def test_rfe_is_exact_on_a_linear_module_where_taylor_is_not():
    """By 0.2 the input has moved less than Taylor's straight line says, the
    case where the relational step (never longer than Taylor's) is exact."""
    predicted, truth = linear_module_run(RelationalEstimator, 1)
    torch.testing.assert_close(predicted, truth, rtol=1e-9, atol=1e-9)
    taylor_predicted, _ = linear_module_run(TaylorEstimator, 1)
    assert (taylor_predicted - truth).abs().max() > 1e-2


def test_rfe_of_order_two_is_far_closer_than_taylor_on_a_linear_module():
    predicted, truth = linear_module_run(RelationalEstimator, 2)
    taylor_predicted, _ = linear_module_run(TaylorEstimator, 2)
    assert (predicted - truth).abs().max() < 0.25 * (taylor_predicted - truth).abs().max()


def test_rfe_falls_back_to_taylor_without_two_full_computations():
    estimator = RelationalEstimator(1)
    estimator.update(1.0, torch.full((1, 3), 2.0), torch.ones(1, 3))
    torch.testing.assert_close(estimator.predict(0.5, torch.zeros(1, 3)), torch.full((1, 3), 2.0))


def test_rfe_keeps_a_gain_per_sample():
    estimator = RelationalEstimator(1)
    estimator.update(1.0, torch.zeros(2, 1), torch.zeros(2, 1))
    estimator.update(0.5, torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [0.5]]))
    # gains are 1 and 2; Taylor's step is +0.5 for both, the inputs move by
    # 0.25 and 0.1 from the last full step
    predicted = estimator.predict(0.25, torch.tensor([[1.25], [0.6]]))
    torch.testing.assert_close(predicted, torch.tensor([[1.25], [1.2]]))


def test_rfe_never_lengthens_taylors_step():
    estimator = RelationalEstimator(1)
    estimator.update(1.0, torch.zeros(1, 2), torch.zeros(1, 2))
    estimator.update(0.5, torch.ones(1, 2), torch.ones(1, 2))
    # the input jumps by 10 where Taylor's step has size 0.5 per element
    predicted = estimator.predict(0.25, torch.full((1, 2), 11.0))
    taylor = TaylorEstimator(1)
    taylor.update(1.0, torch.zeros(1, 2), None)
    taylor.update(0.5, torch.ones(1, 2), None)
    torch.testing.assert_close(predicted, taylor.predict(0.25, None))


def test_keep_leading_drops_the_tokens_a_patch_removed_and_their_memory():
    from rfc_core.history import FeatureHistory

    history = FeatureHistory(order=1)
    history.push(1.0, [torch.arange(12.0).view(1, 12), torch.ones(1, 3)])
    history.push(0.5, [torch.arange(12.0).view(1, 12) * 2, torch.ones(1, 3)])
    before = history.nbytes()
    history.keep_leading([8, 3])
    assert [v.shape[2] for v in history.values] == [8, 3]
    assert history.nbytes() == before - 4 * 2 * 4
    assert history.values[0].untyped_storage().nbytes() == 8 * 2 * 4  # a copy, not a view of the old storage
    assert torch.equal(history.forecast(0.5)[0], torch.arange(8.0).view(1, 8) * 2)
