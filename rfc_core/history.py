"""The newest values of a cached feature, stacked so a forecast is one matmul.

TaylorSeer writes its forecast with finite differences divided by a step
count N, which assumes evenly spaced full computations. RCS makes the spacing
irregular, and samplers such as Heun or dpm_2 evaluate at sigmas that are not
on the schedule at all, so the forecast is the polynomial through the actual
sigmas of the newest `order + 1` full computations. It is kept in Lagrange
form: the values themselves, one slot each in a (batch, order + 1, features)
tensor per stream, and host-side weights per slot. Exact for a trajectory of
degree `order` at any spacing, and for evenly spaced points of degree 1 the
same forecast as TaylorSeer's.

Why this form (the hot path, see benchmarks/overhead.py):
- a prediction, `input + sum_j w_j * value_j`, is one `baddbmm` per stream:
  it reads the input and the slots once and writes the output once, with no
  intermediate tensor;
- recording writes the new value into the oldest point's slot, in place: no
  differences are formed, nothing is allocated after the first record, and
  dropping a point (a repeated or restarted sigma) is bookkeeping only;
- the weights are python numbers until the last moment, so nothing about a
  forecast waits for the device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .storage import FeatureStorage, QuantizedSlots, ScratchPool, empty

# Two full computations closer than this (relative to sigma) are treated as
# the same point: a polynomial through both would amplify noise without bound.
_SAME_SIGMA_RTOL = 1e-6


def flat(t: torch.Tensor) -> torch.Tensor:
    """(batch, features) view of a batch-first feature (a copy only when it is not contiguous)."""
    return t.reshape(t.shape[0], -1)


def lagrange_weights(nodes: Sequence[float], x):
    """Weight of each node's value in the polynomial through them, at x: a
    number, or a tensor (then each weight is one, made on its device)."""
    weights = []
    for j, node in enumerate(nodes):
        weight = 1.0
        for i, other in enumerate(nodes):
            if i != j:
                weight *= (x - other) / (node - other)
        weights.append(weight)
    return weights


class WeightBank:
    """Device tensors of slot weights, made once per evaluation and shared by
    every history with the same points (all modules computed at the same
    evaluations): built from python numbers with fill kernels, never copied
    from the host, so they cost no host sync."""

    def __init__(self):
        self._vectors: dict = {}
        # The run's working tensors (storage.ScratchPool), shared like the
        # weights by every history; kept across evaluations.
        self.scratch = ScratchPool()

    def clear(self) -> None:
        self._vectors.clear()

    def vector(self, by_slot: Sequence[float], batch: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, 1, slots) with by_slot[k] at slot k, in like's dtype and device."""
        key = (tuple(by_slot), batch, like.dtype, like.device)
        vector = self._vectors.get(key)
        if vector is None:
            vector = torch.empty((batch, 1, len(by_slot)), dtype=like.dtype, device=like.device)
            for slot, weight in enumerate(by_slot):
                vector[..., slot].fill_(weight)
            self._vectors[key] = vector
        return vector


class FeatureHistory:
    """The newest `order + 1` values of one feature (one tensor per stream,
    each (batch, features)), newest first."""

    def __init__(self, order: int, storage: FeatureStorage | None = None, bank: WeightBank | None = None):
        self.order = order
        self.storage = storage or FeatureStorage()
        self.bank = bank or WeightBank()
        self.nodes: list[float] = []
        self.slots: list[int] = []
        # Per stream: (batch, order + 1, features), on the storage's device
        # and in its dtype; QuantizedSlots where the storage is int8.
        self.values: list[torch.Tensor | QuantizedSlots] = []
        self._reserved: tuple[float, int] | None = None
        # Quantized storage: the values `commit` writes, between reserve and commit.
        self._pending: list[torch.Tensor] = []
        # The features' own dtype and device, which forecasts are handed back in.
        self._feature: tuple[torch.dtype, torch.device] | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def slot_count(self) -> int:
        return self.order + 1

    @staticmethod
    def _is_same_point(x: float, node: float) -> bool:
        return abs(x - node) <= _SAME_SIGMA_RTOL * max(1.0, abs(node))

    def _fits(self, likes: Sequence[torch.Tensor]) -> bool:
        return (len(self.values) == len(likes)
                and all(v.shape[0] == t.shape[0] and v.shape[2] == t[0].numel() for v, t in zip(self.values, likes)))

    def reserve(self, x: float, likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The slot the value at `x` goes into, one (batch, features) view per
        stream shaped like `likes`, for the caller to fill before `commit`.
        The point whose slot it takes is dropped now, so a value left
        half-written (the block raised) is never read."""
        if not self._fits(likes):
            self.nodes, self.slots = [], []
            # Zeros, not empty: a forecast from fewer points than slots
            # weighs the unused ones 0, and 0 times uninitialised memory
            # can be NaN.
            self.values = [self._allocate(t) for t in likes]
        self._feature = (likes[0].dtype, likes[0].device)
        self._drop_same_point(x)
        if len(self.nodes) == self.slot_count:
            self.nodes.pop()
            self.slots.pop()
        slot = min(set(range(self.slot_count)) - set(self.slots))
        self._reserved = (x, slot)
        if self.storage.quantized:
            # Quantized into the slot by `commit` from the values themselves
            # (`likes` are the values to keep: `push`, the estimators' update),
            # so no working copy of a residual is made.
            self._pending = [flat(t) for t in likes]
            return self._pending
        return [v[:, slot] for v in self.values]

    def _allocate(self, like: torch.Tensor):
        shape = (like.shape[0], self.slot_count, like[0].numel())
        device = self.storage.device or like.device
        if self.storage.quantized:
            return QuantizedSlots(*shape, like.dtype, device)
        return empty(shape, self.storage.dtype or like.dtype, device)

    def commit(self) -> None:
        """The reserved slot holds the value at its sigma: make it the newest point."""
        x, slot = self._reserved
        self._reserved = None
        if self.storage.quantized:
            for values, pending in zip(self.values, self._pending):
                values.write(slot, pending)
            self._pending = []
        self.nodes.insert(0, x)
        self.slots.insert(0, slot)

    def push(self, x: float, values: Sequence[torch.Tensor]) -> None:
        """Keep `values` (one per stream) as the point at x."""
        for target, value in zip(self.reserve(x, values), values):
            target.copy_(flat(value))
        self.commit()

    def _drop_same_point(self, x: float) -> None:
        # A sampler that evaluates twice at one sigma (Heun's second
        # evaluation, a repeated sigma in a custom list) replaces that point;
        # one that adds noise back can return to an older point's sigma,
        # which is dropped with every point older than it: two values at one
        # sigma have no polynomial through them.
        for j, node in enumerate(self.nodes):
            if self._is_same_point(x, node):
                end = 1 if j == 0 else len(self.nodes)
                del self.nodes[j:end]
                del self.slots[j:end]
                return

    def keep_leading(self, features: Sequence[int]) -> None:
        """Keep only the first `features[stream]` features of each stream,
        in storage of that size: the tokens a patch removed from the end of
        a stream (core's FluxKVCache drops the reference images' tokens after
        the first step) are dropped from every point, and their memory freed."""
        self.values = [v if v.shape[2] <= count else
                       v.keep_leading(count) if isinstance(v, QuantizedSlots) else v[..., :count].clone()
                       for v, count in zip(self.values, features)]

    def weights_by_slot(self, x: float) -> list[float]:
        by_slot = [0.0] * self.slot_count
        for slot, weight in zip(self.slots, lagrange_weights(self.nodes, x)):
            by_slot[slot] = weight
        return by_slot

    def newest_by_slot(self) -> list[float]:
        by_slot = [0.0] * self.slot_count
        by_slot[self.slots[0]] = 1.0
        return by_slot

    def combine(self, by_slot, bases: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per stream: base + sum_k w_k * slot_k (no base: the sum alone),
        (batch, features). by_slot: python numbers per slot, or a device
        tensor (batch, 1, slots)."""
        results = []
        for stream, values in enumerate(self.values):
            base = None if bases is None else flat(bases[stream])
            weights = (self.bank.vector(by_slot, values.shape[0], self._like) if not isinstance(by_slot, torch.Tensor)
                       else by_slot)
            if isinstance(values, QuantizedSlots):
                device = base.device if base is not None else self._feature[1]
                combined = values.to(device).accumulate(weights.to(device), base)
                results.append(combined if base is None else combined.to(base.dtype))
                continue
            if base is not None and base.dtype == values.dtype and base.device == values.device:
                # The hot path: one kernel, reading the input and the slots once.
                results.append(torch.baddbmm(base.unsqueeze(1), weights.to(values.dtype), values).squeeze(1))
                continue
            # The cache is kept in another dtype or on another device than the
            # features (cache_dtype, cache_device): the slower general path.
            dtype, device = (base.dtype, base.device) if base is not None else self._feature
            work = values.to(device=device, dtype=torch.promote_types(dtype, values.dtype))
            combined = torch.bmm(weights.to(device=work.device, dtype=work.dtype), work).squeeze(1)
            results.append(combined if base is None else (base + combined).to(base.dtype))
        return results

    def forecast(self, x: float) -> list[torch.Tensor]:
        return self.combine(self.weights_by_slot(x))

    @property
    def _like(self) -> torch.Tensor:
        """A tensor in the dtype and on the device predictions are weighted in."""
        values = self.values[0]
        return values.scales if isinstance(values, QuantizedSlots) else values

    def sampled(self, stream: int, step: int = 1) -> torch.Tensor:
        """Every `step`-th feature of every slot of a stream, (batch, slots,
        features / step), as values (dequantized where stored as int8)."""
        values = self.values[stream]
        if isinstance(values, QuantizedSlots):
            return values.values(features=slice(None, None, step))
        return values if step == 1 else values[..., ::step]

    def tensors(self) -> list[torch.Tensor]:
        return [t for v in self.values for t in (v.tensors() if isinstance(v, QuantizedSlots) else [v])]

    def nbytes(self) -> int:
        return sum(v.nbytes() if isinstance(v, QuantizedSlots) else v.numel() * v.element_size()
                   for v in self.values)
