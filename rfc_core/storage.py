"""Where cached features are kept, and in what dtype.

Features are always computed on the model's device in the model's
dtype (or float32 when that is the cache dtype); only what stays in the
cache between evaluations is moved or converted.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto" keeps the cache on the model's device while its projected peak fits
# in this share of the device memory that is free: the rest is left to
# activations, which grow with resolution and frame count.
AUTO_FREE_SHARE = 0.5


class FeatureStorage:
    """device None: the feature's own device; dtype None: the feature's own dtype."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device or t.device, dtype=self.dtype or t.dtype)

    def working_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype to compute a cached quantity in: the feature's, or the
        cache's when that is wider (a float32 cache of bf16 features keeps
        its divided differences in float32)."""
        return t.dtype if self.dtype is None else torch.promote_types(t.dtype, self.dtype)

    def describe(self) -> str:
        device = "the model's device" if self.device is None else str(self.device)
        return device + ("" if self.dtype is None else f", {str(self.dtype).removeprefix('torch.')}")


def storage_for(cache_device: str, cache_dtype: str) -> FeatureStorage:
    """The storage named by the widgets; cache_device "auto" starts on the
    model's device and may move with `offload_if_needed`."""
    return FeatureStorage("cpu" if cache_device == "cpu" else None, DTYPES.get(cache_dtype))


def should_offload(projected_bytes: int, device: torch.device) -> bool:
    """Whether a cache of `projected_bytes` on `device` would take more than
    AUTO_FREE_SHARE of its free memory. Only CUDA devices report free memory;
    on any other device the cache stays where the model is."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return projected_bytes > AUTO_FREE_SHARE * free
