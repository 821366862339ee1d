"""Schedulers: whether a model evaluation is computed or predicted.

The run (rfc_core.run) applies the rules every scheduler shares (warm-up,
max_skip, the start/end window); a scheduler only adds its own rule.
"""

from __future__ import annotations


class FixedIntervalScheduler:
    """One full computation every `interval` evaluations (FORA, TaylorSeer)."""

    name = "fixed"
    needs_forecast_error = False

    def __init__(self, interval: int):
        self.interval = interval

    def wants_full(self, forecast_error: float | None, full_count: int, cached_in_row: int) -> tuple[bool, str]:
        return cached_in_row + 1 >= self.interval, "interval"

    def on_full(self) -> None:
        pass


class RelationalScheduler:
    """RCS: compute once the input forecast error accumulated since the last
    full computation passes the threshold."""

    name = "rcs"
    needs_forecast_error = True

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.accumulated = 0.0

    def wants_full(self, forecast_error: float | None, full_count: int, cached_in_row: int) -> tuple[bool, str]:
        self.accumulated += forecast_error
        return self.accumulated > self.threshold, "threshold"

    def on_full(self) -> None:
        self.accumulated = 0.0


def make_scheduler(config):
    """The scheduler of a run without a speedup target (see rfc_core.budget)."""
    if config.scheduler == "rcs":
        return RelationalScheduler(config.threshold)
    return FixedIntervalScheduler(config.interval)
