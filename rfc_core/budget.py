"""A speedup target in place of a threshold.

With `target_speedup` S a run of N model evaluations gets a budget of
round(N / S) full computations. Where they go is still RCS's rule: compute
once the first block's input forecast error, accumulated since the last full
computation, passes a threshold. The threshold is estimated online:

- Each eligible evaluation k evaluations after a full computation gives a
  rate estimate r = A_k / G(k), A_k the accumulated error and
  G(k) = 1^q + ... + k^q its growth model, q = order + 2.
- The threshold is the accumulated error a run at the mean rate so far would
  reach S - 1/2 evaluations after a full computation: r_mean * G(S - 1/2).
  Parts of the schedule where the input changes faster than the run's
  average reach it sooner and get more full computations, exactly as with a
  hand-set threshold; the threshold only settles as the mean does.
- A run that has fallen behind its budget (fewer than S - 1/2 evaluations
  left per full computation left) paces the threshold by that spacing
  instead, so the surplus is spread over the rest of the run rather than
  spent back to back on the last evaluations.
- Two guards keep the count whatever the error does: compute when skipping
  would leave budget that can no longer be spent, and skip when computing
  would leave too little for the computations max_skip and the start/end
  window will force later.

Chosen on the bundled benchmark model (benchmarks/target_speedup.py; its
table is in docs/benchmark.md), against the best of 48 hand-set thresholds at the
same number of full computations over 26 settings (20 to 50 steps, max_skip
3 and 5): without the pacing the run spent its leftover budget on the last
evaluations in a row and averaged +0.4 dB; with it +0.9 dB (pacing offsets
from -1/2 to +1/4 gave +0.6 to +0.8 over the same settings plus two beyond
reach). Pacing alone, with no S - 1/2 cap, spent the budget late and lost 1
to 5 dB; a threshold solved from a previous run's error profile, or half the
best hand-set one, did worse; q = order and an exponent fitted online did
no better than q = order + 2.

The number of evaluations comes from the sigma schedule and the evaluations
seen so far per step (Heun-type samplers make two per step).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .schedulers import RelationalScheduler

# Relative tolerance for matching an evaluation's sigma to a schedule step.
STEP_RTOL = 1e-4


class EvaluationPlan:
    """The evaluations a run has made and is expected to make."""

    def __init__(self, sigmas: Sequence[float]):
        # The last sigma is where sampling ends: nothing is evaluated there.
        self.step_sigmas = [float(s) for s in sigmas][:-1]
        self.evaluations = 0
        self.steps_reached = 0
        self._future: list[float] = []

    def observe(self, sigma: float) -> None:
        self.evaluations += 1
        while (self.steps_reached < len(self.step_sigmas)
               and self.step_sigmas[self.steps_reached] >= sigma * (1.0 - STEP_RTOL)):
            self.steps_reached += 1
        self._future = self._project()

    def future(self) -> list[float]:
        """The sigmas of the evaluations after the current one, as many per
        step as the run has made per step so far."""
        return self._future

    @property
    def total(self) -> int:
        return self.evaluations + len(self._future)

    def _project(self) -> list[float]:
        per_step = self.evaluations / max(self.steps_reached, 1)
        sigmas, made = [], 0.0
        for count, sigma in enumerate(self.step_sigmas[self.steps_reached:], start=1):
            due = round(count * per_step)
            sigmas += [sigma] * int(due - made)
            made = due
        return sigmas


def growth(k: int, exponent: int) -> float:
    """G(k): the accumulated error after k evaluations at unit rate."""
    return float(sum(j ** exponent for j in range(1, k + 1)))


def interpolated_growth(length: float, exponent: int) -> float:
    """G at a fractional number of evaluations, linear between integers."""
    low = int(length)
    fraction = length - low
    return (1.0 - fraction) * growth(low, exponent) + fraction * growth(low + 1, exponent)


class SpeedupScheduler(RelationalScheduler):
    """RCS whose threshold is set online to end the run at its budget."""

    def __init__(self, target_speedup: float, order: int, plan: EvaluationPlan,
                 fewest_full: Callable[[list[float], int], int], warmup: int):
        """fewest_full(sigmas, cached_in_row): full computations the run
        cannot avoid over those evaluations (max_skip, the window)."""
        super().__init__(threshold=None)
        self.target_speedup = target_speedup
        self.exponent = order + 2
        self.plan = plan
        self.fewest_full = fewest_full
        self.warmup = warmup
        self._root_rate_sum = 0.0
        self._rate_count = 0

    @property
    def budget(self) -> int:
        return max(self.warmup, round(self.plan.total / self.target_speedup))

    def _observe(self, steps_since_full: int) -> None:
        rate = self.accumulated / growth(steps_since_full, self.exponent)
        # Averaged as rate^(1/(q+1)): the number of full computations a
        # constant threshold makes is linear in that.
        self._root_rate_sum += rate ** (1.0 / (self.exponent + 1))
        self._rate_count += 1

    def wants_full(self, forecast_error: float, full_count: int, cached_in_row: int) -> tuple[bool, str]:
        self.accumulated += forecast_error
        self._observe(cached_in_row + 1)
        future = self.plan.future()
        left = self.budget - full_count
        self.threshold = None
        if left > len(future):
            return True, "budget left to spend"
        if left - 1 < self.fewest_full(future, 0):
            return False, "budget kept for forced computations"
        mean_rate = (self._root_rate_sum / self._rate_count) ** (self.exponent + 1)
        # A run behind its budget paces the threshold by the evaluations left
        # per full computation left, which spreads the surplus over the rest
        # of the run instead of spending it back to back at the end.
        spacing = min(self.target_speedup - 0.5, (len(future) + 1) / left)
        self.threshold = mean_rate * interpolated_growth(spacing, self.exponent)
        return self.accumulated > self.threshold, "threshold"
