"""Polynomial extrapolation of a feature over the noise level.

TaylorSeer writes its forecast with finite differences divided by a step
count N, which assumes evenly spaced full computations. RCS makes the spacing
irregular, and samplers such as Heun or dpm_2 evaluate at sigmas that are not
on the schedule at all, so we extrapolate over the actual sigma of each full
computation instead, in Newton's divided-difference form. That form is exact
for a polynomial trajectory of degree `order` at any spacing, and for evenly
spaced points of degree 1 it is the same forecast as TaylorSeer's.
"""

from __future__ import annotations

import torch

from .storage import FeatureStorage

# Two full computations closer than this (relative to sigma) are treated as the
# same point: dividing by their gap would amplify noise without bound.
_SAME_SIGMA_RTOL = 1e-6


class NewtonHistory:
    """Divided differences of one feature, newest point first.

    Only the newest diagonal of the divided-difference table is kept
    (`order + 1` tensors), which is all a forecast needs.
    """

    def __init__(self, order: int, storage: FeatureStorage | None = None):
        self.order = order
        self.storage = storage or FeatureStorage()
        self.nodes: list[float] = []
        # As stored: on the storage's device and in its dtype.
        self.coeffs: list[torch.Tensor] = []
        # Where and in what dtype forecasts are computed: the newest value's.
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def _coeff(self, j: int) -> torch.Tensor:
        return self.coeffs[j].to(device=self._device, dtype=self._dtype)

    @property
    def newest(self) -> torch.Tensor:
        return self._coeff(0)

    @staticmethod
    def _is_same_point(x: float, node: float) -> bool:
        return abs(x - node) <= _SAME_SIGMA_RTOL * max(1.0, abs(node))

    def push(self, x: float, value: torch.Tensor) -> None:
        self._device, self._dtype = value.device, self.storage.working_dtype(value)
        value = value.to(self._dtype)
        if self.nodes and self._is_same_point(x, self.nodes[0]):
            self._replace_newest(value)
            return
        self._drop_from_same_point(x)
        new_coeffs = [value]
        for j in range(min(len(self.coeffs), self.order)):
            gap = x - self.nodes[j]
            new_coeffs.append((new_coeffs[j] - self._coeff(j)) / gap)
        self.coeffs = [self.storage.keep(c) for c in new_coeffs]
        self.nodes = ([x] + self.nodes)[: self.order + 1]

    def _drop_from_same_point(self, x: float) -> None:
        # A sampler that adds noise back (a restart, a hand-made sigma list)
        # can return to the sigma of an older point. Two points at one sigma
        # have no divided difference, and with only the newest diagonal kept
        # an older point cannot be replaced in place; so it is dropped with
        # every point older than it. The first j coefficients involve only
        # the j newest points and stay exact; the forecast loses order until
        # new points come.
        for j in range(1, len(self.nodes)):
            if self._is_same_point(x, self.nodes[j]):
                del self.nodes[j:]
                del self.coeffs[j:]
                return

    def _replace_newest(self, value: torch.Tensor) -> None:
        # Changing f(x0) by delta moves the j-th coefficient by
        # delta / prod_{i<j}(x0 - x_i) for i = 1..j; the nodes stay the same.
        delta = value - self._coeff(0)
        coeffs = [value]
        denominator = 1.0
        for j in range(1, len(self.coeffs)):
            denominator *= self.nodes[0] - self.nodes[j]
            coeffs.append(self._coeff(j) + delta / denominator)
        self.coeffs = [self.storage.keep(c) for c in coeffs]

    def increment(self, x: float) -> torch.Tensor | None:
        """Forecast at `x` minus the newest value; None when order 0 or one point."""
        if len(self.coeffs) < 2:
            return None
        total = None
        basis = 1.0
        for j in range(1, len(self.coeffs)):
            basis *= x - self.nodes[j - 1]
            term = self._coeff(j) * basis
            total = term if total is None else total + term
        return total

    def forecast(self, x: float) -> torch.Tensor:
        step = self.increment(x)
        return self.newest if step is None else self.newest + step

    def relocate(self, storage: FeatureStorage) -> None:
        self.storage = storage
        self.coeffs = [storage.keep(c) for c in self.coeffs]

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.coeffs)
