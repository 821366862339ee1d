"""Where cached features are kept, and in what dtype.

Features are always computed on the model's device in the model's
dtype (or float32 when that is the cache dtype); only what stays in the
cache between evaluations is moved or converted.
"""

from __future__ import annotations

import math

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
# int8 storage: each run of this many consecutive features (channels within a
# token) shares one absmax scale, kept in the feature's dtype; 64 costs 2 / 64
# of a bf16 slot in scales. Measured on the bundled Flux (issue 30): int8
# residual slots at this group size lose 0.1 to 0.3 dB at NFC 14 to 6, where
# int4 lost 4 to 16 dB; the first block's input, which RCS's decision reads,
# stays in the model's dtype.
QUANT_GROUP = 64
INT8_MAX = 127.0
# Features quantized at a time (QuantizedSlots.write): 16 Mi features, 64 MiB in float32.
QUANT_PIECE = 2 ** 24
class FeatureStorage:
    """device None: the feature's own device; dtype None: the feature's own dtype."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype

    @property
    def quantized(self) -> bool:
        """Residual slots are kept as int8 with group-wise scales (QuantizedSlots)."""
        return self.dtype == torch.int8

    def precise(self) -> "FeatureStorage":
        """This storage for what stays unquantized: the first block's input,
        which RCS's decision reads, is kept in the feature's dtype under int8."""
        return FeatureStorage(self.device) if self.quantized else self

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor as stored unquantized (module inputs; the int8 format's
        are kept in the feature's own dtype)."""
        dtype = None if self.quantized else self.dtype
        return t.to(device=self.device or t.device, dtype=dtype or t.dtype)

    def working_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype to compute a cached quantity in: the feature's, or the
        cache's when that is wider (a float32 cache of bf16 features keeps
        its divided differences in float32)."""
        return t.dtype if self.dtype is None or self.quantized else torch.promote_types(t.dtype, self.dtype)

    def describe(self) -> str:
        device = "the model's device" if self.device is None else str(self.device)
        return device + ("" if self.dtype is None else f", {str(self.dtype).removeprefix('torch.')}")


def storage_for(cache_device: str, cache_dtype: str) -> FeatureStorage:
    """The storage named by the widgets, before the memory plan (rfc_core.memory)
    fills in what they leave on auto."""
    return FeatureStorage("cpu" if cache_device == "cpu" else None, DTYPES.get(cache_dtype))


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for a cache slot: in pinned system memory where a CUDA device
    copies to and from it (about twice as fast as pageable memory). The
    copies stay synchronous: the cache's host-side reads (trust samples,
    fault checks) would otherwise race them."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)


def quant_group(features: int) -> int:
    """The largest power of two up to QUANT_GROUP that divides `features`."""
    group = QUANT_GROUP
    while features % group:
        group //= 2
    return group


class QuantizedSlots:
    """(batch, slots, features) as int8 `codes` and (batch, slots, groups)
    `scales` in the feature's dtype: value = code * scale, per group of
    consecutive features. Slots are written whole (`write`) and read either
    into a weighted sum (`accumulate`, the hot path) or back as values."""

    def __init__(self, batch: int, slots: int, features: int, dtype: torch.dtype, device: torch.device):
        self.group = quant_group(features)
        self.codes = empty((batch, slots, features), torch.int8, device)
        self.scales = empty((batch, slots, features // self.group), dtype, device)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], t.shape[-1] // self.group, self.group)

    @torch.no_grad()
    def write(self, slot: int, values: torch.Tensor) -> None:
        """Quantize (batch, features) values into `slot`, a piece of at most
        QUANT_PIECE features at a time: the float32 working copies stay tens
        of MB where a video model's residual is hundreds."""
        piece = max(self.group, QUANT_PIECE // max(1, values.shape[0]) // self.group * self.group)
        for start in range(0, values.shape[1], piece):
            grouped = self._grouped(values[:, start:start + piece])
            # absmax per group in one pass, no |x| copy.
            absmax = torch.linalg.vector_norm(grouped, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32)
            # float32 codes in one pass from the values' own dtype (the
            # product promotes); |x| <= absmax keeps them within +-127.
            codes = torch.mul(grouped, INT8_MAX / absmax.clamp_min(torch.finfo(torch.float32).tiny)).round_()
            self.codes[:, slot, start:start + piece].copy_(codes.reshape(codes.shape[0], -1))
            self.scales[:, slot, start // self.group:(start + piece) // self.group].copy_(
                absmax.squeeze(-1).div_(INT8_MAX))

    def values(self, slots=slice(None), features=slice(None), dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """Dequantized (batch, len(slots), len(features)) for the ones asked
        (features: a slice with a step; the scales follow each feature)."""
        codes = self.codes[:, slots, features]
        start, stop, step = features.indices(self.codes.shape[-1])
        groups = torch.arange(start, stop, step, device=self.device) // self.group
        scales = self.scales[:, slots].index_select(-1, groups)
        dtype = dtype or self.dtype
        return (codes.to(device=device or self.device, dtype=dtype)
                * scales.to(device=device or self.device, dtype=dtype))

    def accumulate(self, weights: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """base + sum_k weights[:, 0, k] * slot_k, (batch, features): one
        kernel for the scaled weights and one fused multiply-add per slot,
        reading each slot's codes once."""
        batch, slots, features = self.codes.shape
        scaled = self.scales * weights.to(self.scales.dtype).transpose(1, 2)  # (batch, slots, groups)
        result = None if base is None else base.reshape(batch, features // self.group, self.group)
        for slot in range(slots):
            codes = self._grouped(self.codes[:, slot])
            scale = scaled[:, slot].unsqueeze(-1)
            if result is None:
                result = torch.mul(codes, scale)
            elif slot == 0:
                result = torch.addcmul(result, codes, scale)
            else:
                result.addcmul_(codes, scale)
        return result.reshape(batch, features)

    def keep_leading(self, count: int) -> "QuantizedSlots":
        """The first `count` features, requantized where groups do not split evenly."""
        if count % self.group == 0:
            self.codes = self.codes[..., :count].clone()
            self.scales = self.scales[..., :count // self.group].clone()
            return self
        values = self.values(features=slice(0, count))
        kept = QuantizedSlots(values.shape[0], values.shape[1], count, self.dtype, self.device)
        for slot in range(values.shape[1]):
            kept.write(slot, values[:, slot])
        return kept

    def to(self, device: torch.device) -> "QuantizedSlots":
        if device == self.device:
            return self
        moved = QuantizedSlots.__new__(QuantizedSlots)
        moved.group = self.group
        moved.codes = empty(self.codes.shape, torch.int8, device)
        moved.codes.copy_(self.codes)
        moved.scales = empty(self.scales.shape, self.scales.dtype, device)
        moved.scales.copy_(self.scales)
        return moved

    def tensors(self) -> list[torch.Tensor]:
        return [self.scales]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


class ScratchPool:
    """Reused working tensors, by name: where a span's residual adds up
    block by block. A run keeps one pool; each name is lent to one use at a
    time, and blocks of other shapes (Flux's double and single blocks) share
    its memory, so the pool holds the largest use of each name, not one
    tensor per shape."""

    def __init__(self):
        self._tensors: dict = {}

    def get(self, name, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        tensor = self._tensors.get(name)
        if tensor is None or tensor.dtype != dtype or tensor.device != device or tensor.numel() < count:
            self._tensors[name] = None  # the old one is freed before the new one is made
            tensor = self._tensors[name] = torch.empty(count, dtype=dtype, device=device)
        return tensor[:count].view(shape)

    def clear(self) -> None:
        self._tensors.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())
