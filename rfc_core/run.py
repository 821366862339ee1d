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
from typing import Hashable, Sequence

import torch

from .budget import EvaluationPlan, SpeedupScheduler
from .config import CacheConfig
from .estimators import TaylorEstimator, make_estimator
from .newton import NewtonHistory
from .schedulers import make_scheduler
from .storage import FeatureStorage


def relative_l1(actual: torch.Tensor, forecast: torch.Tensor) -> float:
    """||actual - forecast||_1 / ||actual||_1, both sums brought to the host
    together: one device sync for the decision instead of two."""
    difference, size = torch.stack(((actual - forecast).abs().float().sum(), actual.abs().float().sum())).tolist()
    return 0.0 if size == 0.0 else difference / size


@dataclass
class Evaluation:
    sigma: float
    computed: bool = True
    forecast_error: float | None = None
    # The scheduler's accumulated error and threshold at the decision, when it made one.
    accumulated: float | None = None
    threshold: float | None = None
    # Why it was computed or predicted.
    reason: str = ""


@dataclass
class ChunkCache:
    modules: dict[Hashable, TaylorEstimator] = field(default_factory=dict)
    first_input: NewtonHistory | None = None

    def nbytes(self) -> int:
        total = sum(m.nbytes() for m in self.modules.values())
        return total + (self.first_input.nbytes() if self.first_input is not None else 0)


class RFCRun:
    def __init__(self, config: CacheConfig, first_module: Hashable,
                 skip_window: tuple[float, float] | None = None, schedule: Sequence[float] | None = None,
                 storage: FeatureStorage | None = None):
        """skip_window: (highest, lowest) sigma; evaluations with
        lowest < sigma <= highest may be skipped. None allows every sigma.
        schedule: the run's sigmas, the last one where sampling ends; read
        only with a speedup target, which needs it. storage: where cached features are kept."""
        self.config = config
        self.first_module = first_module
        self.skip_window = skip_window
        self.storage = storage or FeatureStorage()
        # Only a speedup target needs to know the evaluations still to come.
        self.plan: EvaluationPlan | None = None
        if config.target_speedup:
            if schedule is None:
                raise ValueError("a speedup target needs the run's sigma schedule")
            self.plan = EvaluationPlan(schedule)
            self.scheduler = SpeedupScheduler(config.target_speedup, config.order, self.plan, self.fewest_full,
                                              config.warmup)
        else:
            self.scheduler = make_scheduler(config)
        self.chunks: dict[Hashable, ChunkCache] = {}
        self.evaluations: list[Evaluation] = []
        self.full_count = 0
        self.cached_in_row = 0
        self.modules_computed = 0
        self.modules_predicted = 0
        self.peak_bytes = 0
        self._skip: bool | None = None
        # Set when caching is switched off for the rest of the run (a
        # fault): evaluations are still counted, all of them computed.
        self.off_reason: str | None = None

    @property
    def current(self) -> Evaluation | None:
        return self.evaluations[-1] if self.evaluations else None

    def start_evaluation(self, sigma: float) -> None:
        self._track_memory()
        self.evaluations.append(Evaluation(sigma=float(sigma)))
        if self.plan is not None:
            self.plan.observe(float(sigma))
        self._skip = None
        if self.off_reason is not None:
            self.current.reason = self.off_reason
            self._settle(False)

    def switch_off(self, reason: str) -> None:
        """Compute everything from here on; the evaluation in progress keeps
        the decision it got, every later one is counted as computed."""
        self.off_reason = reason
        self.finish()

    def rebase(self, first_module: Hashable) -> None:
        """Cache other modules from the next evaluation on (blocks to the
        whole model call after a block fault): history is dropped, so the new
        first module computes until it has points of its own."""
        self.finish()
        self.first_module = first_module

    def _in_window(self, sigma: float) -> bool:
        if self.skip_window is None:
            return True
        highest, lowest = self.skip_window
        return lowest < sigma <= highest

    def fewest_full(self, sigmas: list[float], cached_in_row: int) -> int:
        """Full computations that max_skip and the window force over
        evaluations at `sigmas`, however the rest is decided."""
        forced = 0
        for sigma in sigmas:
            if not self._in_window(sigma) or cached_in_row >= self.config.max_skip:
                forced += 1
                cached_in_row = 0
            else:
                cached_in_row += 1
        return forced

    def best_speedup(self) -> float | None:
        """The most model evaluations per full computation this run can reach
        with max_skip, the window and warm-up, at one evaluation per step;
        None without a speedup target."""
        if self.plan is None or not self.plan.step_sigmas:
            return None
        sigmas = self.plan.step_sigmas
        warmup = min(self.config.warmup, len(sigmas))
        return len(sigmas) / (warmup + self.fewest_full(sigmas[warmup:], 0))

    def _forced_reason(self, chunk: ChunkCache) -> str | None:
        config = self.config
        if not config.skipping_enabled:
            return "never skips"
        if not self._in_window(self.current.sigma):
            return "outside start/end"
        if self.full_count < config.warmup:
            return "warm-up"
        if self.cached_in_row >= config.max_skip:
            return "max_skip"
        if not self._has_history(chunk):
            return "no history yet"
        return None

    def _decide_skip(self, chunk: ChunkCache, module_input: torch.Tensor) -> bool:
        evaluation = self.current
        evaluation.reason = self._forced_reason(chunk)
        if evaluation.reason is not None:
            return False
        if self.scheduler.needs_forecast_error:
            forecast = chunk.first_input.forecast(evaluation.sigma)
            evaluation.forecast_error = relative_l1(module_input, forecast)
        full, evaluation.reason = self.scheduler.wants_full(evaluation.forecast_error, self.full_count,
                                                             self.cached_in_row)
        evaluation.accumulated = getattr(self.scheduler, "accumulated", None)
        evaluation.threshold = getattr(self.scheduler, "threshold", None)
        return not full

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
        if self.current is None or self.off_reason is not None:
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
        if self.current is None or self.off_reason is not None:
            return
        sigma = self.current.sigma
        chunk = self.chunks.setdefault(chunk_key, ChunkCache())
        estimator = chunk.modules.get(module_key)
        if estimator is None:
            estimator = chunk.modules[module_key] = make_estimator(self.config.estimator, self.config.order,
                                                                  self.storage)
        estimator.update(sigma, residual, module_input)
        if module_key == self.first_module and self.scheduler.needs_forecast_error:
            if chunk.first_input is None:
                chunk.first_input = NewtonHistory(self.config.order, self.storage)
            chunk.first_input.push(sigma, module_input)

    def relocate(self, storage: FeatureStorage) -> None:
        """Keep every cached feature, and every later one, in `storage`."""
        self.storage = storage
        for chunk in self.chunks.values():
            for estimator in chunk.modules.values():
                estimator.relocate(storage)
            if chunk.first_input is not None:
                chunk.first_input.relocate(storage)

    def cached_device(self) -> torch.device | None:
        """Where the cache's features are, None while it holds none."""
        for chunk in self.chunks.values():
            for estimator in chunk.modules.values():
                if estimator.history.coeffs:
                    return estimator.history.coeffs[0].device
        return None

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

    @property
    def speedup(self) -> float:
        """Model evaluations per full computation."""
        computed = self.computed_evaluations
        return len(self.evaluations) / computed if computed else 1.0

    def summary(self) -> str:
        target = f", target {self.config.target_speedup:g}x" if self.config.target_speedup else ""
        return (f"computed {self.computed_evaluations} of {len(self.evaluations)} model evaluations "
                f"({self.speedup:.1f}x fewer{target}); block calls computed {self.modules_computed}, "
                f"predicted {self.modules_predicted}; cache peak {format_bytes(self.peak_bytes)} "
                f"on {self.storage.describe()}")

    def step_table(self) -> str:
        """One line per model evaluation, for the debug log."""
        lines = ["  #  sigma      computed  error      accumulated  threshold  why"]
        for number, e in enumerate(self.evaluations, start=1):
            lines.append(f"{number:3d}  {e.sigma:<9.4g}  {'yes' if e.computed else 'no':<8s}  "
                         f"{_number(e.forecast_error):<9s}  {_number(e.accumulated):<11s}  "
                         f"{_number(e.threshold):<9s}  {e.reason}")
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_bytes(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"
