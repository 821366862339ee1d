"""Estimators: what a cached module's output is taken to be on a skipped step.

Every estimator works on a module's *residual* (output minus input), flattened
per sample to shape (batch, features), one tensor per stream the module
updates. Caching the residual rather than the block output keeps the running
hidden state, which on a skipped step is built from the predictions of the
blocks before, as the base that the prediction is added to: the same
arrangement the paper has for its attention and MLP branches.

Each estimator predicts by a weight per cached value (rfc_core.history), so
a skipped module costs one fused matmul per stream, and the weights are
either python numbers or, for RFE, a (batch, 1, slots) tensor made by a few
kernels on per-sample norms: nothing waits for the device.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .history import FeatureHistory, WeightBank, flat
from .storage import FeatureStorage

# Below this norm an input change is treated as zero.
_TINY = 1e-12
# About this many features per stream are sampled to judge how far a
# module's extrapolated step held (RelationalEstimator.trust).
TRUST_SAMPLE = 4096


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm over everything but the batch dimension, shaped (batch, 1),
    accumulated in at least float32 (no float32 copy is made), so
    half-precision features do not overflow."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(flat(t), dim=1, keepdim=True, dtype=dtype)


def _streams(values) -> list[torch.Tensor]:
    return list(values) if isinstance(values, (list, tuple)) else [values]


class TaylorEstimator:
    """TaylorSeer's forecast (order 0 is plain reuse, as in FORA)."""

    name = "taylor"

    def __init__(self, order: int, storage: FeatureStorage | None = None, bank: WeightBank | None = None,
                 norm: Callable[[torch.Tensor], torch.Tensor] = per_sample_norm):
        self.order = order
        self.history = FeatureHistory(order, storage, bank)
        # Per-sample L2 norm, (batch, 1): over every sequence-parallel rank's
        # tokens where the run has a reduction (rfc_core.run.RFCRun).
        self.norm = norm

    @property
    def ready(self) -> bool:
        return len(self.history) > 0

    # Recording. The runtime writes a computed residual straight into the
    # slot `reserve` returns, then calls `commit`; `update` is the same for
    # residuals that already exist as tensors.
    def reserve(self, sigma: float, likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.history.reserve(sigma, likes)

    def commit(self, module_input: torch.Tensor | None) -> None:
        self.history.commit()

    def update(self, sigma: float, residuals, module_input: torch.Tensor | None) -> None:
        residuals = _streams(residuals)
        for slot, residual in zip(self.reserve(sigma, residuals), residuals):
            slot.copy_(flat(residual))
        self.commit(module_input)

    # Prediction.
    def weights(self, sigma: float, module_input: torch.Tensor | None):
        """Per slot: python numbers, or a (batch, 1, slots) device tensor."""
        return self.history.weights_by_slot(sigma)

    def predict_onto(self, sigma: float, module_input: torch.Tensor | None,
                     bases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """base + predicted residual per stream, (batch, features), fused."""
        return self.history.combine(self.weights(sigma, module_input), bases)

    def predict(self, sigma: float, module_input: torch.Tensor | None):
        """The predicted residual (a list when the module has several streams)."""
        predicted = self.history.combine(self.weights(sigma, module_input))
        return predicted[0] if len(predicted) == 1 else predicted

    def keep_leading(self, features: Sequence[int]) -> None:
        """See FeatureHistory.keep_leading: module inputs are left as they are."""
        self.history.keep_leading(features)

    def tensors(self) -> list[torch.Tensor]:
        return self.history.tensors()

    def nbytes(self) -> int:
        return self.history.nbytes()


class ReuseEstimator(TaylorEstimator):
    """The last computed output, unchanged (FORA)."""

    name = "reuse"

    def __init__(self, order: int = 0, storage: FeatureStorage | None = None, bank: WeightBank | None = None,
                 norm: Callable[[torch.Tensor], torch.Tensor] = per_sample_norm):
        super().__init__(0, storage, bank, norm)


class RelationalEstimator(TaylorEstimator):
    """RFE: Taylor gives the direction, the input change gives the size.

    s = |O(t) - O(t+N)| / |I(t) - I(t+N)| is taken from the last two full
    computations, and the prediction is O(t) + s * |I - I(t)| * T / |T| with T
    the Taylor increment. Norms are per sample, so each image in a batch keeps
    its own gain. Until two full computations exist, or where the input
    change vanished, it falls back to the Taylor forecast.

    The relational step may shorten Taylor's step but never lengthen it. On a
    skipped step the input is built from a running state that has already
    drifted off the full-compute trajectory (earlier blocks and earlier steps
    were predicted), and a norm only grows with drift, so |I - I(t)|
    overestimates the real input change; left unbounded the overshoot feeds
    the next step's drift. On the bundled benchmark model this took RFE from
    worse than TaylorSeer in closed loop (20.3 against 29.5 dB at NFC 10,
    order 1) to better (29.7 dB), although teacher-forced RFE beats Taylor
    without any bound.

    With the points the forecast has two of (order 1, or any order right
    after its history was cut back), T = L1 * (O(t+N) - O(t)) for the
    Lagrange weight L1 of the older point, so |T| = |L1| * |O(t) - O(t+N)|
    and the output norms cancel: the step is Taylor's scaled by
    min(1, |I - I(t)| / (|I(t) - I(t+N)| * |L1|)). Nothing of the output is
    read to predict it, and only the small module inputs are normed. With
    more points |T| / |O(t) - O(t+N)| depends on the outputs and is
    computed from them.

    Trust. Over long gaps a local extrapolation overshoots: at 6 of 50 full
    computations on the bundled Flux, order-1 RFE lost 9 dB to plain reuse.
    So each full computation also measures how much of the step the
    forecast would have taken to it was real: trust = <actual change,
    forecast change> / |forecast change|^2, clamped to [0, 1], on a regular
    sample of about TRUST_SAMPLE features (tokens and channels both vary
    along it). Every prediction until the next full computation takes that
    fraction of its step: 1 where the trajectory is as linear as the
    forecast assumes, 0 (reuse) where the last step went nowhere it
    predicted. The run reads the trust values to the host in the host sync
    its decision already makes (rfc_core.run), so the weights stay python
    numbers and a skipped block costs no extra kernel; runs without a
    forecast-error decision (the fixed schedules) keep trust 1, RFE as
    published.
    """

    name = "rfe"

    def __init__(self, order: int, storage: FeatureStorage | None = None, bank: WeightBank | None = None,
                 norm: Callable[[torch.Tensor], torch.Tensor] = per_sample_norm):
        super().__init__(order, storage, bank, norm)
        # As stored (see FeatureHistory.values).
        self.last_input: torch.Tensor | None = None
        # (batch, 1, slots) float32: -1 at the newest slot and +1 at the one
        # before, over |I(t) - I(t+N)| per sample; None until two full
        # computations with their inputs.
        self.input_step: torch.Tensor | None = None
        # |O(t) - O(t+N)| per sample, only kept where the forecast has more than two points.
        self.output_change: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        # The fraction of each extrapolated step predictions take (see the
        # class docstring); set by the run from `trust_sums`.
        self.trust = 1.0
        # (sampled forecast change per stream, the slot it is measured from)
        # between reserve and commit.
        self._forecast_step: tuple[list[torch.Tensor], int] | None = None
        # Features sampled to measure trust; None: all of them (under
        # sequence parallelism, where a rank's sample would not be the
        # unsplit run's).
        self.trust_sample: int | None = TRUST_SAMPLE
        # (2,) float32 on the cache's device: sum of actual * forecast change
        # and of forecast change squared, from the last full computation,
        # until the run reads it.
        self.trust_sums: torch.Tensor | None = None

    def _trust_sample(self, stream: int) -> torch.Tensor:
        """Every k-th feature of each slot of a stream, k odd so a stride
        over (tokens x channels) walks through the channels as well."""
        features = self.history.values[stream].shape[-1]
        return self.history.sampled(stream, 1 if self.trust_sample is None
                                    else max(1, features // self.trust_sample) | 1)

    @torch.compiler.disable
    def reserve(self, sigma: float, likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        history = self.history
        self._forecast_step = None
        if len(history) >= 2 and not history._is_same_point(sigma, history.nodes[0]) and history._fits(likes):
            # The forecast the cache would have made to this evaluation, on
            # the sample, before the new value takes the oldest point's slot.
            newest = history.slots[0]
            direction = [t - n for t, n in zip(history.weights_by_slot(sigma), history.newest_by_slot())]
            steps = []
            for stream in range(len(history.values)):
                sample = self._trust_sample(stream)
                weights = history.bank.vector(direction, sample.shape[0], sample)
                steps.append(torch.bmm(weights, sample).squeeze(1))
            self._forecast_step = (steps, newest)
        return super().reserve(sigma, likes)

    def commit(self, module_input: torch.Tensor | None) -> None:
        if module_input is None:
            raise ValueError("RelationalEstimator needs the module input")
        super().commit(module_input)
        history = self.history
        self._measure_trust()
        self.input_step = None
        if self.last_input is not None and self.last_input.shape == module_input.shape and len(history) >= 2:
            change = self.norm(module_input - self._last_input(module_input))
            inverse_change = (1.0 / change.clamp_min(_TINY)).view(-1, 1, 1)
            # (newest - older slot) / |I(t) - I(t+N)|: the slot weights move
            # along it by the input change, see `weights`.
            self.input_step = inverse_change * history.bank.vector(self._along_older(), 1, inverse_change)
            if self.order >= 2:
                newest, older = history.slots[:2]
                self.output_change = self._norm_over_streams(values[:, 0] - values[:, 1] for values in (
                    history.sampled(stream)[:, [newest, older]] for stream in range(len(history.values))))
        self.last_input = history.storage.keep(module_input)
        like = history._like
        if self._weights is None or self._weights.shape[0] != like.shape[0] or self._weights.dtype != like.dtype:
            # Where predictions write their weights: allocated once per run, when recording.
            self._weights = torch.empty((like.shape[0], 1, history.slot_count), dtype=like.dtype,
                                        device=like.device)

    # Not traced by torch.compile: a traced graph may sum in another order,
    # and a trust that differs in its last bit changes every prediction.
    @torch.compiler.disable
    def _measure_trust(self) -> None:
        forecast, self._forecast_step = self._forecast_step, None
        if forecast is None:
            return
        steps, older = forecast
        history = self.history
        if older not in history.slots[1:]:
            return
        newest = history.slots[0]
        actual_dot, forecast_square = 0.0, 0.0
        for stream, step in enumerate(steps):
            sample = self._trust_sample(stream)
            actual = (sample[:, newest] - sample[:, older]).float()
            step = step.float()
            # nansum: NaN in a token the model drops (text tokens after the
            # last block) must not cost the whole block its trust.
            actual_dot = actual_dot + (actual * step).nansum()
            forecast_square = forecast_square + step.square().nansum()
        self.trust_sums = torch.stack((actual_dot, forecast_square))

    def set_trust(self, actual_dot: float, forecast_square: float) -> None:
        """From the run, with `trust_sums` read (and summed over ranks)."""
        self.trust_sums = None
        if forecast_square > 0.0 and math.isfinite(actual_dot / forecast_square):
            self.trust = min(1.0, max(0.0, actual_dot / forecast_square))

    def _norm_over_streams(self, streams) -> torch.Tensor:
        """Per-sample norm of a module's streams taken together, (batch, 1)."""
        return torch.cat([self.norm(t).square() for t in streams], dim=1).sum(dim=1, keepdim=True).sqrt()

    def _along_older(self) -> list[float]:
        """Per slot: -1 at the newest point, +1 at the one before it."""
        by_slot = [0.0] * self.history.slot_count
        newest, older = self.history.slots[:2]
        by_slot[newest], by_slot[older] = -1.0, 1.0
        return by_slot

    def _last_input(self, like: torch.Tensor) -> torch.Tensor:
        return self.last_input.to(device=like.device, dtype=like.dtype)

    def weights(self, sigma: float, module_input: torch.Tensor | None):
        # Once per skipped module: no grad-mode switch where sampling already
        # runs without grad (ComfyUI's samplers do), which costs host time.
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._weights_for(sigma, module_input)
        return self._weights_for(sigma, module_input)

    def _weights_for(self, sigma: float, module_input: torch.Tensor | None):
        history = self.history
        trust = self.trust
        taylor = history.weights_by_slot(sigma)
        if len(history) < 2 or self.input_step is None or module_input is None:
            return [n + trust * (t - n) for t, n in zip(taylor, history.newest_by_slot())]
        values = history.values[0]
        batch = values.shape[0]
        input_change = self.norm(module_input - self._last_input(module_input)).view(batch, 1, 1)
        newest, older = history.slots[:2]
        if len(history) == 2:
            # With two points Taylor's weights are (1 - L, L) on (newest,
            # older), L the older point's Lagrange weight, and RFE's are
            # (1 - s * m, s * m) with s the sign of L and
            # m = min(|L|, |I - I(t)| / |I(t) - I(t+N)|): the newest weight
            # plus the input change along `input_step`, clamped at Taylor's;
            # then trust scales the step, m to trust * m.
            if abs(taylor[older]) <= _TINY:
                return taylor
            older_weight = trust * taylor[older]
            sign = 1.0 if taylor[older] > 0 else -1.0
            low, high = [-math.inf] * history.slot_count, [math.inf] * history.slot_count
            if sign < 0:
                low[older], high[newest] = older_weight, 1.0 - older_weight
            else:
                high[older], low[newest] = older_weight, 1.0 - older_weight
            like = self.input_step
            start = torch.addcmul(history.bank.vector(history.newest_by_slot(), 1, like), input_change,
                                  self.input_step, value=sign * trust)
            return torch.clamp(start, min=history.bank.vector(low, 1, like), max=history.bank.vector(high, 1, like),
                               out=self._weights)
        # More points: |T| / |O(t) - O(t+N)| depends on the outputs.
        newest_weights = history.newest_by_slot()
        direction = [t - n for t, n in zip(taylor, newest_weights)]
        step_norm = self._norm_over_streams(history.combine(direction))
        relative_step = (step_norm / self.output_change.clamp_min(_TINY)).view(batch, 1, 1)
        # relational = |I - I(t)| / |I(t) - I(t+N)|, read off input_step's older slot.
        relational = input_change * self.input_step[..., older:older + 1]
        factor = torch.minimum(relational, relative_step) / relative_step.clamp_min(_TINY)
        like = factor
        return torch.addcmul(history.bank.vector(newest_weights, 1, like), factor,
                             history.bank.vector(direction, 1, like), value=trust, out=self._weights)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([] if self.last_input is None else [self.last_input])

    def nbytes(self) -> int:
        extra = 0 if self.last_input is None else self.last_input.numel() * self.last_input.element_size()
        return super().nbytes() + extra


ESTIMATORS = {
    ReuseEstimator.name: ReuseEstimator,
    TaylorEstimator.name: TaylorEstimator,
    RelationalEstimator.name: RelationalEstimator,
}


def make_estimator(kind: str, order: int, storage: FeatureStorage | None = None, bank: WeightBank | None = None,
                   norm: Callable[[torch.Tensor], torch.Tensor] = per_sample_norm) -> TaylorEstimator:
    return ESTIMATORS[kind](order, storage, bank, norm)
