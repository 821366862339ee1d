"""Settings of one cache, validated with the widget names users see."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .estimators import ESTIMATORS
from .storage import DTYPES

SCHEDULERS = ("rcs", "fixed")
# auto: where the memory plan puts it (rfc_core.memory): the model's device
# while the cache fits beside the step there, else system memory; model:
# always on the model's device; cpu: always in system memory.
CACHE_DEVICES = ("auto", "model", "cpu")
# auto: the dtype the model computed the feature in, or int8 where the plan
# needs it to fit; int8: residual slots as int8 with group-wise scales.
CACHE_DTYPES = ("auto", *DTYPES)

# (low, high) inclusive, per widget; the node definitions read the same table.
RANGES = {
    "threshold": (0.0, 10.0),
    "max_skip": (0, 50),
    "order": (0, 2),
    "interval": (1, 50),
    "start_percent": (0.0, 1.0),
    "end_percent": (0.0, 1.0),
    "target_speedup": (0.0, 20.0),
    "computed_head": (0.0, 1.0),
    "cache_span": (0, 64),
    "memory_budget": (0.0, 1024.0),
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
    target_speedup: when above 0, the threshold is ignored and RCS spends
        about one full computation per `target_speedup` model evaluations
        (rfc_core.budget); only with the rcs scheduler.
    cache_device / cache_dtype: where, and in what dtype, cached features
        are kept (CACHE_DEVICES, CACHE_DTYPES).
    computed_head: the share of the blocks, from the first, that every
        evaluation computes, predicted ones too: in a predicted evaluation
        only the blocks after them are forecast, from the hidden state the
        computed ones hand on. Spends compute below whole evaluations, which
        few-step runs need (each step is a large jump); 0 predicts whole
        evaluations. Block granularity only.
    cache_span: consecutive blocks cached as one unit, whose summed residual
        is forecast from its first block's input; 0: the memory plan picks
        the finest that fits (1, per block, where the cache fits).
    memory_budget: the most the whole cache may take, in GB (2^30 bytes),
        wherever it is kept; 0: what the device and system memory can give
        (rfc_core.memory).
    """

    threshold: float = 0.1
    max_skip: int = 3
    order: int = 1
    estimator: str = "rfe"
    scheduler: str = "rcs"
    interval: int = 3
    start_percent: float = 0.0
    end_percent: float = 1.0
    target_speedup: float = 0.0
    cache_device: str = "auto"
    cache_dtype: str = "auto"
    computed_head: float = 0.0
    cache_span: int = 0
    memory_budget: float = 0.0

    def __post_init__(self):
        for widget in RANGES:
            check_range(widget, getattr(self, widget))
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"RFC Cache: 'estimator' must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"RFC Cache: 'scheduler' must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        for widget, allowed in (("cache_device", CACHE_DEVICES), ("cache_dtype", CACHE_DTYPES)):
            if getattr(self, widget) not in allowed:
                raise ValueError(f"RFC Cache: '{widget}' must be one of {list(allowed)}, got {getattr(self, widget)!r}")
        if 0.0 < self.target_speedup < 1.0:
            raise ValueError(f"RFC Cache: 'target_speedup' must be 0 (off: the threshold rules) or between 1 and "
                             f"{RANGES['target_speedup'][1]}, got {self.target_speedup}")
        if self.target_speedup and self.scheduler != "rcs":
            raise ValueError("RFC Cache: 'target_speedup' works with the rcs scheduler only; set it to 0 to use "
                             "the fixed scheduler's interval")
        if self.target_speedup > self.max_skip + 1:
            raise ValueError(f"RFC Cache: 'target_speedup' {self.target_speedup} needs 'max_skip' of at least "
                             f"{math.ceil(self.target_speedup - 1)} (one full computation per "
                             f"{self.target_speedup} evaluations skips that many in a row), got {self.max_skip}")
        if self.start_percent >= self.end_percent:
            raise ValueError(
                f"RFC Cache: 'start_percent' ({self.start_percent}) must be below 'end_percent' ({self.end_percent})")

    @property
    def skipping_enabled(self) -> bool:
        if self.max_skip == 0:
            return False
        if self.target_speedup:
            return self.target_speedup > 1.0
        if self.scheduler == "rcs":
            return self.threshold > 0
        return self.interval > 1

    @property
    def warmup(self) -> int:
        """Full computations before the first skip.

        The fixed schedules (FORA, TaylorSeer) compute the m + 1 points an
        order-m forecast needs first, as published. RCS needs one: until a
        module has m + 1 points its forecast is the polynomial through those
        it has (reuse after one), and the first block's forecast error
        decides when the next computation is due. Forcing the second point
        at the second step spent a computation on a slope over one step,
        the worst there is to extrapolate from: on the bundled Flux at 6 of
        50 full computations RFC went from 18.5 to 21.8 dB with one.
        """
        return 1 if self.scheduler == "rcs" else self.order + 1

    def describe(self) -> str:
        if self.target_speedup:
            rule = f"target speedup {self.target_speedup}"
        elif self.scheduler == "rcs":
            rule = f"threshold {self.threshold}"
        else:
            rule = f"interval {self.interval}"
        if self.computed_head:
            rule += f", first {self.computed_head:.0%} of blocks always computed"
        storage = f"cache on {self.cache_device}" + ("" if self.cache_dtype == "auto" else f" in {self.cache_dtype}")
        if self.cache_span:
            storage += f", spans of {self.cache_span}"
        if self.memory_budget:
            storage += f", at most {self.memory_budget:g} GB"
        return (f"{self.estimator} + {self.scheduler} (order {self.order}, {rule}, max_skip {self.max_skip}, "
                f"{storage})")
