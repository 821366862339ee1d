"""Model family adapters, tried in order; the first that matches is used."""

from __future__ import annotations

from .base import BlockAdapter
from .flux import ChromaAdapter, FluxAdapter

# Chroma before Flux: a subclass must win over a class it might derive from.
ADAPTERS: tuple[BlockAdapter, ...] = (ChromaAdapter(), FluxAdapter())


def detect_adapter(diffusion_model) -> BlockAdapter | None:
    for adapter in ADAPTERS:
        if adapter.matches(diffusion_model):
            return adapter
    return None


def supported_families() -> list[str]:
    return [adapter.family for adapter in ADAPTERS]
