"""Model family adapters: one module per family, each listing its adapters in
a module-level `ADAPTERS` tuple. They are collected here, so a new family is
one new file. The most specific match wins (see `BlockAdapter.specificity`)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import REPLACE, FORWARD, BlockAdapter, BlockGroup


def _collect() -> tuple[BlockAdapter, ...]:
    found = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        found.extend(getattr(module, "ADAPTERS", ()))
    return tuple(found)


ADAPTERS: tuple[BlockAdapter, ...] = _collect()


def detect_adapter(diffusion_model) -> BlockAdapter | None:
    best, best_depth = None, None
    for adapter in ADAPTERS:
        depth = adapter.specificity(diffusion_model)
        if depth is not None and (best_depth is None or depth < best_depth):
            best, best_depth = adapter, depth
    return best


def adapter_for(family: str) -> BlockAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise KeyError(family)


def supported_families() -> list[str]:
    return sorted(adapter.family for adapter in ADAPTERS)


__all__ = ["ADAPTERS", "BlockAdapter", "BlockGroup", "FORWARD", "REPLACE", "adapter_for", "detect_adapter",
           "supported_families"]
