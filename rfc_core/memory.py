"""How big a run's cache will be, and which layout of it fits the memory there is.

The cache is projected at the first block of the first evaluation, when
every shape is known and nothing is allocated yet: every cached unit's
residual slots (order + 1 each), the first block's input kept for RCS's
decision, each unit's input kept for RFE, and the working tensors the
layout needs, over every sample of every chunk (cond and uncond). Then the
finest layout that fits is chosen before any slot exists:

1. span: how many consecutive blocks of one group are cached as one unit
   (1 is per block, RFC as published; a span forecasts the sum of its
   blocks' residuals from its first block's input, at 1 / span the bytes);
2. storage: the feature's dtype, or int8 with group-wise scales for the
   residual slots (about half a bf16 cache, a quarter of a float32 one);
3. place: the model's device, or system memory.

For each span from 1 up, the four (storage, place) pairs are tried in the
order device native, device int8, system native, system int8: the finest
granularity first, then the least quantization error, then the least
traffic. Nothing that fits means the whole model call is cached instead
(a latent or two, RFC's fallback for models without a block adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .storage import QUANT_GROUP

GIB = 2 ** 30
# Spans tried, in this order, up to the longest block group.
SPANS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Layout:
    span: int = 1
    int8: bool = False
    system: bool = False

    def describe(self) -> str:
        unit = "per block" if self.span == 1 else f"spans of {self.span} blocks"
        storage = "int8" if self.int8 else "the model's dtype"
        place = "system memory" if self.system else "the model's device"
        return f"{unit}, {storage}, on {place}"


@dataclass(frozen=True)
class Footprint:
    """One run's cache as shapes, per sample: known at the first block.

    group_blocks: cached blocks per block group, in the order the model runs
        them (spans never cross groups: their streams differ);
    residual_features: one block's residual, all its streams;
    first_input_features: the first block's module input (RCS);
    sampled_input_features: another block's module input, as RFE keeps it;
    element_size: bytes per feature in the storage's native dtype;
    samples: batch times conditionings, over every chunk of an evaluation;
    slots: order + 1;
    chunk_samples: the samples of the largest chunk (cond and uncond run in
        one batch, or apart under memory pressure): the working tensors are
        one chunk's.
    """

    group_blocks: tuple[int, ...]
    residual_features: int
    first_input_features: int
    sampled_input_features: int
    element_size: int
    samples: int
    slots: int
    chunk_samples: int = 0

    def units(self, span: int) -> int:
        return sum(math.ceil(blocks / span) for blocks in self.group_blocks)

    def parts(self, layout: Layout) -> dict[str, int]:
        """Bytes of each part of the cache under `layout`; "working" is what
        is on the device whatever the layout's place (a block's input kept
        apart, a span's summed residual, a system unit's slots read in)."""
        per_feature = (1 + self.element_size / QUANT_GROUP) if layout.int8 else self.element_size
        residual_one = self.samples * self.residual_features
        chunk_one = (self.chunk_samples or self.samples) * self.residual_features * self.element_size
        units = self.units(layout.span)
        # A block's input kept apart while it runs, its residual formed in
        # place there (in the model's dtype on the device it goes straight
        # into its slot), where a span's residual adds up, and a unit's slots
        # moved to the device for its prediction. Quantizing works on
        # pieces of QUANT_PIECE features.
        working = chunk_one * ((layout.int8 or layout.span > 1 or layout.system) + (layout.span > 1))
        if layout.system:
            working += self.slots * chunk_one * per_feature / self.element_size
        return {
            "residual slots": int(units * self.slots * residual_one * per_feature),
            "first block's input": (self.slots + 1) * self.samples * self.first_input_features * self.element_size,
            "block inputs": units * self.samples * self.sampled_input_features * self.element_size,
            "working": int(working),
        }

    def stored(self, layout: Layout) -> int:
        parts = self.parts(layout)
        return sum(parts.values()) - parts["working"]

    def on_device(self, layout: Layout) -> int:
        return self.parts(layout)["working"] + (0 if layout.system else self.stored(layout))

    def on_system(self, layout: Layout) -> int:
        return self.stored(layout) if layout.system else 0

    def total(self, layout: Layout) -> int:
        return sum(self.parts(layout).values())


@dataclass(frozen=True)
class Budget:
    """Bytes the cache may take; None: not limited (a device that reports no
    free memory is only limited by the cap).

    device: what the device can give without evicting weights the step needs;
    system: available RAM less a margin;
    cap: the user's memory_budget, for the whole cache wherever it is."""

    device: int | None = None
    system: int | None = None
    cap: int | None = None

    def admits(self, footprint: Footprint, layout: Layout) -> bool:
        return ((self.cap is None or footprint.total(layout) <= self.cap)
                and (self.device is None or footprint.on_device(layout) <= self.device)
                and (self.system is None or footprint.on_system(layout) <= self.system))


def candidates(footprint: Footprint, span: int | None = None, int8: bool | None = None,
               system: bool | None = None) -> list[Layout]:
    """Every layout in the order of preference, with what the user fixed kept fixed."""
    longest = max(footprint.group_blocks, default=1)
    spans = [span] if span else [s for s in SPANS if s <= longest] or [1]
    pairs = [(False, False), (True, False), (False, True), (True, True)]
    return [Layout(s, q, place) for s in spans for q, place in pairs
            if (int8 is None or q == int8) and (system is None or place == system)]


def choose_layout(footprint: Footprint, budget: Budget, span: int | None = None, int8: bool | None = None,
                  system: bool | None = None) -> Layout | None:
    """The first layout in `candidates` that the budget admits; None: none does."""
    for layout in candidates(footprint, span, int8, system):
        if budget.admits(footprint, layout):
            return layout
    return None
