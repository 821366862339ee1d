"""Settings of one cache, validated with the widget names users see."""

from __future__ import annotations

from dataclasses import dataclass

from .estimators import ESTIMATORS

SCHEDULERS = ("rcs", "fixed")

# (low, high) inclusive, per widget; the node definitions read the same table.
RANGES = {
    "threshold": (0.0, 10.0),
    "max_skip": (0, 50),
    "order": (0, 2),
    "interval": (1, 50),
    "start_percent": (0.0, 1.0),
    "end_percent": (0.0, 1.0),
}


def check_range(widget: str, value) -> None:
    low, high = RANGES[widget]
    if not (low <= value <= high):
        raise ValueError(f"RFC Cache: '{widget}' must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class CacheConfig:
    """One cache's settings.

    threshold: RCS budget of accumulated relative L1 forecast error of the
        first block's input before a full computation is forced; 0 never skips.
    max_skip: most model evaluations in a row that may be predicted; 0 never skips.
    order: Taylor order of the forecasts (0 is plain reuse).
    interval: for the fixed scheduler, one full computation every `interval`
        evaluations.
    start_percent / end_percent: only evaluations inside this part of the
        schedule may be skipped (0 is the start of sampling, 1 the end).
    """

    threshold: float = 0.1
    max_skip: int = 3
    order: int = 1
    estimator: str = "rfe"
    scheduler: str = "rcs"
    interval: int = 3
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        for widget in RANGES:
            check_range(widget, getattr(self, widget))
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"RFC Cache: 'estimator' must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"RFC Cache: 'scheduler' must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.start_percent >= self.end_percent:
            raise ValueError(
                f"RFC Cache: 'start_percent' ({self.start_percent}) must be below 'end_percent' ({self.end_percent})")

    @property
    def skipping_enabled(self) -> bool:
        if self.max_skip == 0:
            return False
        if self.scheduler == "rcs":
            return self.threshold > 0
        return self.interval > 1

    @property
    def warmup(self) -> int:
        """Full computations needed before the first skip: a forecast of order m needs m+1 points."""
        return self.order + 1

    def describe(self) -> str:
        rule = f"threshold {self.threshold}" if self.scheduler == "rcs" else f"interval {self.interval}"
        return f"{self.estimator} + {self.scheduler} (order {self.order}, {rule}, max_skip {self.max_skip})"
