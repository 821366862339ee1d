"""State of one sampling run: every cached feature and counter lives here.

A run is created when sampling starts and dropped when it ends, so nothing
survives from one run to the next. One model evaluation may be split into
several chunks (cond and uncond batched together or run apart); each chunk
keeps its own cached features, but the compute-or-predict decision is made
once per evaluation, by the first chunk that reaches the first module, and
every other chunk follows it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from .budget import STEP_RTOL, EvaluationPlan, SpeedupScheduler
from .config import CacheConfig
from .estimators import TaylorEstimator, make_estimator, per_sample_norm
from .history import FeatureHistory, WeightBank, flat, lagrange_weights
from .schedulers import make_scheduler
from .storage import FeatureStorage


# A run of at most this many steps that ends the denoising (its schedule
# ends at sigma 0) computes its last evaluation: at 4 to 10 steps each step
# is a large jump, and the last one lays down the finest detail, which a
# forecast from the coarser steps before it cannot know. Longer runs end in
# small steps that forecast well (the benchmark tables at 50 steps). A first
# stage that hands on a noisy latent is not the end of the image.
SHORT_RUN_STEPS = 10


@dataclass
class Evaluation:
    # NaN until read from the device (RFCRun.sigma): the decision reads it
    # in the same host sync as the forecast error.
    sigma: float
    computed: bool = True
    forecast_error: float | None = None
    # The scheduler's accumulated error and threshold at the decision, when it made one.
    accumulated: float | None = None
    threshold: float | None = None
    # Why it was computed or predicted.
    reason: str = ""
    # Blocks (or model calls) whose prediction reached the model.
    predicted_modules: int = 0
    # Blocks (or model calls) computed in it: in a predicted evaluation, those
    # with nothing to predict from (a conditioning new to the run).
    computed_modules: int = 0
    # Blocks of the computed head (CacheConfig.computed_head) a predicted
    # evaluation computed, as planned: it still counts as predicted.
    head_modules: int = 0

    @property
    def counts_as_computed(self) -> bool:
        """Computed as the summary counts it: decided so, or predicted with
        blocks computed all the same, which cost what a computation costs."""
        return self.computed or self.computed_modules > 0


@dataclass
class ChunkCache:
    modules: dict[Hashable, TaylorEstimator] = field(default_factory=dict)
    # The first module's inputs, for the RCS forecast error.
    first_input: FeatureHistory | None = None

    def nbytes(self) -> int:
        total = sum(m.nbytes() for m in self.modules.values())
        return total + (self.first_input.nbytes() if self.first_input is not None else 0)


class RFCRun:
    def __init__(self, config: CacheConfig, first_module: Hashable,
                 skip_window: tuple[float, float] | None = None, schedule: Sequence[float] | None = None,
                 storage: FeatureStorage | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 head_blocks: frozenset = frozenset()):
        """skip_window: (highest, lowest) sigma; evaluations with
        lowest < sigma <= highest may be skipped. None allows every sigma.
        schedule: the run's sigmas, the last one where sampling ends; read
        only with a speedup target, which needs it. storage: where cached features are kept.
        reduce: under sequence parallelism, where each rank holds a slice of
        the tokens, a function returning the sum of a tensor over the ranks
        (an all-reduce). The forecast error's two sums and every norm RFE
        takes are then global, so every rank takes the same decisions and
        the same relational steps as one unsplit run would.
        head_blocks: the block keys (kind, index) every evaluation computes
        (CacheConfig.computed_head), predicted evaluations included."""
        self.config = config
        self.head_blocks = head_blocks
        self.first_module = first_module
        self.skip_window = skip_window
        steps = [float(s) for s in schedule][:-1] if schedule is not None else []
        self.last_step_sigma = (steps[-1] if 0 < len(steps) <= SHORT_RUN_STEPS and float(schedule[-1]) == 0.0
                                else None)
        self.storage = storage or FeatureStorage()
        self.reduce = reduce
        self.norm = per_sample_norm if reduce is None else self._global_norm
        # Slot weights shared by every module's history within an evaluation.
        self.bank = WeightBank()
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
        self.recomputed_evaluations = 0
        self.peak_bytes = 0
        # Estimators whose trust (RelationalEstimator.trust) the last full
        # computation measured, until the next decision reads it.
        self._unread_trust: dict[int, TaylorEstimator] = {}
        self._skip: bool | None = None
        # The evaluation's timestep as the sampler passed it, until read.
        self._timestep: torch.Tensor | None = None
        # Set when caching is switched off for the rest of the run (a
        # fault): evaluations are still counted, all of them computed.
        self.off_reason: str | None = None
        # Chunks of one evaluation may run in threads of their own (one per
        # device under core's MultiGPU node): the first to reach the first
        # module decides, under this lock, and the others wait and follow.
        self._lock = threading.RLock()

    @property
    def current(self) -> Evaluation | None:
        return self.evaluations[-1] if self.evaluations else None

    def start_evaluation(self, timestep) -> None:
        """timestep: the evaluation's sigma, a number or a tensor on the
        model's device; a tensor is read only when something needs it."""
        self._track_memory()
        self.bank.clear()
        self._read_pending_sigma()
        self.evaluations.append(Evaluation(sigma=float("nan")))
        self._timestep = None
        if isinstance(timestep, torch.Tensor):
            self._timestep = timestep.detach().flatten()[:1]
        else:
            self._resolve(float(timestep))
        self._skip = None
        if self.off_reason is not None:
            self.current.reason = self.off_reason
            self._settle(False)

    def _resolve(self, sigma: float) -> None:
        self.current.sigma = sigma
        self._timestep = None
        if self.plan is not None:
            self.plan.observe(sigma)

    def _read_pending_sigma(self) -> None:
        # An evaluation nothing read the sigma of (caching was off) still
        # gets it, for the summary.
        if self._timestep is not None:
            self._resolve(float(self._timestep))

    @property
    def sigma(self) -> float:
        """The current evaluation's sigma; one host sync the first time it is
        needed, when the decision did not already bring it."""
        if self._timestep is not None:
            with self._lock:
                self._read_pending_sigma()
        return self.current.sigma

    def in_head(self, module_key: Hashable) -> bool:
        """Whether the module belongs to a block of the computed head."""
        return isinstance(module_key, tuple) and module_key[:2] in self.head_blocks

    def count_module(self, predicted: bool, head: bool = False) -> None:
        """Count a module (block or model call) that was predicted or
        computed; head: a computed head block (in_head)."""
        with self._lock:
            if predicted:
                self.modules_predicted += 1
                self.current.predicted_modules += 1
                return
            self.modules_computed += 1
            evaluation = self.current
            if evaluation is None:
                return
            if head and not evaluation.computed:
                evaluation.head_modules += 1
                return
            if not evaluation.computed and evaluation.computed_modules == 0:
                evaluation.reason += "; blocks with nothing to predict from were computed"
            evaluation.computed_modules += 1

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

    def _must_compute_at(self, sigma: float) -> str | None:
        """Why an evaluation at this sigma is computed whatever the scheduler says."""
        if self.last_step_sigma is not None and sigma <= self.last_step_sigma * (1.0 + STEP_RTOL):
            return "last step of a short run"
        if self.skip_window is not None:
            highest, lowest = self.skip_window
            if not lowest < sigma <= highest:
                return "outside start/end"
        return None

    def fewest_full(self, sigmas: list[float], cached_in_row: int) -> int:
        """Full computations that max_skip and the window force over
        evaluations at `sigmas`, however the rest is decided."""
        forced = 0
        for sigma in sigmas:
            if self._must_compute_at(sigma) is not None or cached_in_row >= self.config.max_skip:
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

    def _global_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(per_sample_norm(t).square()).sqrt()

    def _forced_reason(self, chunk: ChunkCache) -> str | None:
        """Why this evaluation must be computed whatever its sigma."""
        config = self.config
        if not config.skipping_enabled:
            return "never skips"
        if self.full_count < config.warmup:
            return "warm-up"
        if self.cached_in_row >= config.max_skip:
            return "max_skip"
        if not self._has_history(chunk):
            return "no history yet"
        return None

    @torch.no_grad()
    def _forecast_error_and_sigma(self, chunk: ChunkCache, module_input: torch.Tensor) -> tuple[float, float]:
        """The relative L1 error of the first module's input against its
        forecast, and the evaluation's sigma, in one host sync. The forecast
        weights are made on the device from the timestep tensor when the
        sigma is not known yet."""
        history = chunk.first_input
        actual = flat(module_input)
        timestep = None
        if self._timestep is None:
            weights = [-w for w in history.weights_by_slot(self.current.sigma)]
        else:
            timestep = self._timestep.to(device=actual.device, dtype=torch.float32)
            weights = torch.zeros((actual.shape[0], 1, history.slot_count), device=actual.device)
            for slot, weight in zip(history.slots, lagrange_weights(history.nodes, timestep)):
                weights[..., slot] = -weight
        # actual - forecast, in one kernel where the cache is in the input's dtype.
        (difference,) = history.combine(weights, [actual])
        sums = torch.stack((torch.linalg.vector_norm(difference, ord=1, dtype=torch.float32),
                            torch.linalg.vector_norm(actual, ord=1, dtype=torch.float32)))
        trusting = list(self._unread_trust.values())
        self._unread_trust.clear()
        if trusting:
            sums = torch.cat([sums] + [e.trust_sums.to(sums.device) for e in trusting])
        if self.reduce is not None:
            sums = self.reduce(sums)
        if timestep is not None:
            sums = torch.cat((sums, timestep.reshape(1)))
        read = sums.tolist()
        difference, size = read[:2]
        sigma = self.current.sigma if timestep is None else read[-1]
        for number, estimator in enumerate(trusting):
            estimator.set_trust(*read[2 + 2 * number:4 + 2 * number])
        error = 0.0 if size == 0.0 else difference / size
        # An input with inf or NaN in it cannot be judged: compute.
        return (error if math.isfinite(error) else math.inf), sigma

    def _decide_skip(self, chunk: ChunkCache, module_input: torch.Tensor) -> bool:
        evaluation = self.current
        evaluation.reason = self._forced_reason(chunk)
        if evaluation.reason is not None:
            return False
        if self.scheduler.needs_forecast_error:
            evaluation.forecast_error, sigma = self._forecast_error_and_sigma(chunk, module_input)
            if self._timestep is not None:
                self._resolve(sigma)
        evaluation.reason = self._must_compute_at(self.sigma)
        if evaluation.reason is not None:
            evaluation.forecast_error = None
            return False
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

    def recompute_current(self, reason: str) -> None:
        """The evaluation in progress was predicted and its output is not
        usable: it is computed again, in full, and counted as computed."""
        evaluation = self.current
        if evaluation.computed:
            return
        self._settle(False)
        self.modules_predicted -= evaluation.predicted_modules
        evaluation.predicted_modules = 0
        evaluation.reason = reason
        self.recomputed_evaluations += 1

    @property
    def predicting(self) -> bool:
        """Whether the evaluation in progress uses predictions."""
        return self._skip is True

    def needs_module_input(self, module_key: Hashable) -> bool:
        """Only RFE and the RCS decision read module inputs; skip building them otherwise."""
        if self.config.estimator == "rfe":
            return True
        return module_key == self.first_module and self.scheduler.needs_forecast_error

    def predicts(self, chunk_key: Hashable, module_key: Hashable, module_input: torch.Tensor | None) -> bool:
        """Whether this module is predicted in this evaluation (the first
        module takes the evaluation's decision)."""
        if self.current is None or self.off_reason is not None:
            return False
        chunk = self._chunk(chunk_key)
        if self._skip is None and module_key == self.first_module:
            with self._lock:
                if self._skip is None:
                    self._settle(self._decide_skip(chunk, module_input))
        if self.in_head(module_key):
            return False
        estimator = chunk.modules.get(module_key)
        return bool(self._skip) and estimator is not None and estimator.ready

    def predict_onto(self, chunk_key: Hashable, module_key: Hashable, module_input: torch.Tensor | None,
                     bases) -> list[torch.Tensor]:
        """Each stream's input plus its predicted residual, (batch, features);
        only after `predicts` said yes."""
        estimator = self.chunks[chunk_key].modules[module_key]
        return estimator.predict_onto(self.sigma, module_input, bases)

    def predict(self, chunk_key: Hashable, module_key: Hashable,
                module_input: torch.Tensor | None):
        """The predicted residual of this module, or None when it must be computed."""
        if not self.predicts(chunk_key, module_key, module_input):
            return None
        self.count_module(predicted=True)
        return self.chunks[chunk_key].modules[module_key].predict(self.sigma, module_input)

    def _chunk(self, chunk_key: Hashable) -> ChunkCache:
        chunk = self.chunks.get(chunk_key)
        if chunk is None:
            chunk = self.chunks[chunk_key] = ChunkCache()
        return chunk

    def _estimator(self, chunk_key: Hashable, module_key: Hashable) -> TaylorEstimator:
        chunk = self._chunk(chunk_key)
        estimator = chunk.modules.get(module_key)
        if estimator is None:
            estimator = chunk.modules[module_key] = make_estimator(self.config.estimator, self.config.order,
                                                                  self.storage, self.bank, self.norm)
            if self.reduce is not None and hasattr(estimator, "trust_sample"):
                estimator.trust_sample = None
        return estimator

    def keep_leading(self, chunk_key: Hashable, module_key: Hashable, features: Sequence[int]) -> None:
        """A module's streams lost tokens at their end (a patch dropped them
        mid-run): keep the first `features` per stream of what it cached."""
        chunk = self.chunks.get(chunk_key)
        estimator = None if chunk is None else chunk.modules.get(module_key)
        if estimator is not None:
            estimator.keep_leading(features)

    def records(self) -> bool:
        return self.current is not None and self.off_reason is None

    @torch.no_grad()
    def reserve(self, chunk_key: Hashable, module_key: Hashable, likes) -> list[torch.Tensor] | None:
        """Where a module about to be computed writes its residual, one
        (batch, features) tensor per stream; None when nothing is recorded."""
        if not self.records():
            return None
        return self._estimator(chunk_key, module_key).reserve(self.sigma, likes)

    @torch.no_grad()
    def commit(self, chunk_key: Hashable, module_key: Hashable, module_input: torch.Tensor | None) -> None:
        """The reserved residual is written: keep it, with the module input."""
        estimator = self._estimator(chunk_key, module_key)
        estimator.commit(module_input)
        self._note_trust(estimator)
        self._record_first_input(chunk_key, module_key, module_input)

    def _note_trust(self, estimator: TaylorEstimator) -> None:
        if getattr(estimator, "trust_sums", None) is not None and self.scheduler.needs_forecast_error:
            with self._lock:
                self._unread_trust[id(estimator)] = estimator

    def record(self, chunk_key: Hashable, module_key: Hashable,
               module_input: torch.Tensor | None, residual) -> None:
        """Count a computed module and store its residual (`store`). With
        `predict`, the interface for callers that count nothing themselves."""
        self.count_module(predicted=False, head=self.in_head(module_key))
        self.store(chunk_key, module_key, module_input, residual)

    @torch.no_grad()
    def store(self, chunk_key: Hashable, module_key: Hashable,
              module_input: torch.Tensor | None, residual) -> None:
        """Keep a computed module's residual (output minus input): a tensor,
        or a list of them for a module of several streams."""
        if not self.records():
            return
        estimator = self._estimator(chunk_key, module_key)
        estimator.update(self.sigma, residual, module_input)
        self._note_trust(estimator)
        self._record_first_input(chunk_key, module_key, module_input)

    def _record_first_input(self, chunk_key, module_key, module_input) -> None:
        if module_key == self.first_module and self.scheduler.needs_forecast_error:
            chunk = self.chunks[chunk_key]
            if chunk.first_input is None:
                # Never quantized: RCS's forecast error reads it (rfc_core.storage).
                chunk.first_input = FeatureHistory(self.config.order, self.storage.precise(), self.bank)
            chunk.first_input.push(self.sigma, [module_input])

    @torch.no_grad()
    def drop_non_finite(self) -> int:
        """Drop every module whose cached values hold inf or NaN (one host
        sync over the whole cache; only after a prediction came out
        non-finite). Returns how many were dropped."""
        held = [(chunk, key, estimator) for chunk in self.chunks.values() for key, estimator in chunk.modules.items()]
        inputs = [chunk for chunk in self.chunks.values() if chunk.first_input is not None]
        flags = [torch.stack([torch.isfinite(t).all() for t in estimator.tensors()]).all() for _, _, estimator in held]
        flags += [torch.stack([torch.isfinite(t).all() for t in chunk.first_input.tensors()]).all() for chunk in inputs]
        if not flags:
            return 0
        finite = [bool(f) for f in torch.stack([f.cpu() for f in flags]).tolist()]
        dropped = 0
        for (chunk, key, _), ok in zip(held, finite):
            if not ok:
                del chunk.modules[key]
                dropped += 1
        for chunk, ok in zip(inputs, finite[len(held):]):
            if not ok:
                chunk.first_input = None
        return dropped

    def cache_bytes(self) -> int:
        """Everything the run holds: cached features and the working tensors."""
        return sum(chunk.nbytes() for chunk in self.chunks.values()) + self.bank.scratch.nbytes()

    def _track_memory(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    def finish(self) -> None:
        """Drop every cached tensor; counters stay for the summary."""
        self._track_memory()
        if self.current is not None:
            self._read_pending_sigma()
        self.chunks.clear()
        self._unread_trust.clear()
        self.bank.clear()
        self.bank.scratch.clear()

    @property
    def computed_evaluations(self) -> int:
        return sum(1 for e in self.evaluations if e.counts_as_computed)

    @property
    def speedup(self) -> float:
        """Model evaluations per full computation."""
        computed = self.computed_evaluations
        return len(self.evaluations) / computed if computed else 1.0

    def rounded_target(self) -> str:
        """How a speedup target came out at this run's length, where a whole
        number of full computations cannot meet it (4 steps at 1.5x: 3
        computed, 1.33x); empty where it can, or without a target."""
        if self.plan is None or not self.plan.step_sigmas:
            return ""
        steps = len(self.plan.step_sigmas)
        budget = max(self.config.warmup, round(steps / self.config.target_speedup))
        reachable = steps / budget
        if abs(reachable - self.config.target_speedup) <= 0.05 * self.config.target_speedup:
            return ""
        return f"{budget} of {steps} steps computed is {reachable:.2f}x, the nearest a whole number of steps gives"

    def summary(self) -> str:
        target = ""
        if self.config.target_speedup:
            rounded = self.rounded_target()
            target = f", target {self.config.target_speedup:g}x" + (f": {rounded}" if rounded else "")
        head = ""
        head_calls = sum(e.head_modules for e in self.evaluations)
        if head_calls:
            # Predicted evaluations computed their head: the share of block
            # calls is what the run cost, not the evaluations predicted.
            share = self.modules_computed / max(1, self.modules_computed + self.modules_predicted)
            head = (f" ({head_calls} of them in the head that predicted evaluations compute: "
                    f"{share:.0%} of the block calls)")
        return (f"computed {self.computed_evaluations} of {len(self.evaluations)} model evaluations "
                f"({self.speedup:.1f}x fewer{target}); block calls computed {self.modules_computed}{head}, "
                f"predicted {self.modules_predicted}; cache peak {format_bytes(self.peak_bytes)} "
                f"on {self.storage.describe()}")

    def why_nothing_was_predicted(self) -> str | None:
        """When the threshold left nothing to predict in a run that could
        have (past the warm-up, inside the window, no fault): every forecast
        error passed it. Said with the errors, so a user sees how far off
        the threshold is; None otherwise."""
        decided = [e for e in self.evaluations if e.reason == "threshold"]
        if (self.plan is not None or self.off_reason is not None or len(decided) < 2
                or any(not e.counts_as_computed for e in self.evaluations)):
            return None
        errors = sorted(e.forecast_error for e in decided)
        median = errors[len(errors) // 2]
        return (f"nothing was predicted: the forecast error passed the threshold {self.config.threshold:g} at "
                f"every step (median {median:.2g})")

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
