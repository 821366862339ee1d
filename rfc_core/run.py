"""State of one sampling run: every cached feature and counter lives here.

A run is created when sampling starts and dropped when it ends, so nothing
survives from one run to the next. One model evaluation may be split into
several chunks (cond and uncond batched together or run apart); each chunk
keeps its own cached features, but the compute-or-predict decision is made
once per evaluation, by the first chunk that reaches the first module, and
every other chunk follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from .config import CacheConfig
from .estimators import TaylorEstimator, make_estimator
from .newton import NewtonHistory
from .schedulers import make_scheduler


def relative_l1(actual: torch.Tensor, forecast: torch.Tensor) -> float:
    denominator = actual.abs().float().sum().item()
    if denominator == 0.0:
        return 0.0
    return (actual - forecast).abs().float().sum().item() / denominator


@dataclass
class Evaluation:
    sigma: float
    computed: bool = True
    forecast_error: float | None = None


@dataclass
class ChunkCache:
    modules: dict[Hashable, TaylorEstimator] = field(default_factory=dict)
    first_input: NewtonHistory | None = None

    def nbytes(self) -> int:
        total = sum(m.nbytes() for m in self.modules.values())
        return total + (self.first_input.nbytes() if self.first_input is not None else 0)


class RFCRun:
    def __init__(self, config: CacheConfig, first_module: Hashable,
                 skip_window: tuple[float, float] | None = None):
        """skip_window: (highest, lowest) sigma; evaluations with
        lowest < sigma <= highest may be skipped. None allows every sigma."""
        self.config = config
        self.first_module = first_module
        self.skip_window = skip_window
        self.scheduler = make_scheduler(config)
        self.chunks: dict[Hashable, ChunkCache] = {}
        self.evaluations: list[Evaluation] = []
        self.full_count = 0
        self.cached_in_row = 0
        self.modules_computed = 0
        self.modules_predicted = 0
        self.peak_bytes = 0
        self._skip: bool | None = None

    @property
    def current(self) -> Evaluation | None:
        return self.evaluations[-1] if self.evaluations else None

    def start_evaluation(self, sigma: float) -> None:
        self._track_memory()
        self.evaluations.append(Evaluation(sigma=float(sigma)))
        self._skip = None

    def _in_window(self, sigma: float) -> bool:
        if self.skip_window is None:
            return True
        highest, lowest = self.skip_window
        return lowest < sigma <= highest

    def _decide_skip(self, chunk: ChunkCache, module_input: torch.Tensor) -> bool:
        evaluation = self.current
        config = self.config
        if (not config.skipping_enabled or not self._in_window(evaluation.sigma)
                or self.full_count < config.warmup or self.cached_in_row >= config.max_skip
                or not self._has_history(chunk)):
            return False
        if self.scheduler.needs_forecast_error:
            forecast = chunk.first_input.forecast(evaluation.sigma)
            evaluation.forecast_error = relative_l1(module_input, forecast)
        return not self.scheduler.wants_full(evaluation.forecast_error, self.cached_in_row)

    def _has_history(self, chunk: ChunkCache) -> bool:
        # The forecast of order m needs m + 1 points at distinct sigmas: a
        # computed evaluation at the sigma of the one before (heun's second
        # evaluation, a repeated sigma in a custom list) adds none, and a
        # chunk that appeared mid-run has only its own points.
        if self.scheduler.needs_forecast_error and (
                chunk.first_input is None or len(chunk.first_input) < self.config.warmup):
            return False
        return self.first_module in chunk.modules

    def _settle(self, skip: bool) -> None:
        self._skip = skip
        self.current.computed = not skip
        if skip:
            self.cached_in_row += 1
        else:
            self.full_count += 1
            self.cached_in_row = 0
            self.scheduler.on_full()

    def needs_module_input(self, module_key: Hashable) -> bool:
        """Only RFE and the RCS decision read module inputs; skip building them otherwise."""
        if self.config.estimator == "rfe":
            return True
        return module_key == self.first_module and self.scheduler.needs_forecast_error

    def predict(self, chunk_key: Hashable, module_key: Hashable,
                module_input: torch.Tensor | None) -> torch.Tensor | None:
        """The predicted residual of this module, or None when it must be computed."""
        if self.current is None:
            return None
        chunk = self.chunks.setdefault(chunk_key, ChunkCache())
        if self._skip is None and module_key == self.first_module:
            self._settle(self._decide_skip(chunk, module_input))
        estimator = chunk.modules.get(module_key)
        if not self._skip or estimator is None or not estimator.ready:
            return None
        self.modules_predicted += 1
        return estimator.predict(self.current.sigma, module_input)

    def record(self, chunk_key: Hashable, module_key: Hashable,
               module_input: torch.Tensor | None, residual: torch.Tensor) -> None:
        """Store a computed module's residual (output minus input)."""
        self.modules_computed += 1
        if self.current is None:
            return
        sigma = self.current.sigma
        chunk = self.chunks.setdefault(chunk_key, ChunkCache())
        estimator = chunk.modules.get(module_key)
        if estimator is None:
            estimator = chunk.modules[module_key] = make_estimator(self.config.estimator, self.config.order)
        estimator.update(sigma, residual, module_input)
        if module_key == self.first_module and self.scheduler.needs_forecast_error:
            if chunk.first_input is None:
                chunk.first_input = NewtonHistory(self.config.order)
            chunk.first_input.push(sigma, module_input)

    def cache_bytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks.values())

    def _track_memory(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    def finish(self) -> None:
        """Drop every cached tensor; counters stay for the summary."""
        self._track_memory()
        self.chunks.clear()

    @property
    def computed_evaluations(self) -> int:
        return sum(1 for e in self.evaluations if e.computed)

    def summary(self) -> str:
        total = len(self.evaluations)
        computed = self.computed_evaluations
        ratio = total / computed if computed else 1.0
        return (f"computed {computed} of {total} model evaluations ({ratio:.1f}x fewer); "
                f"block calls computed {self.modules_computed}, predicted {self.modules_predicted}; "
                f"cache peak {self.peak_bytes / 2**20:.1f} MiB")
