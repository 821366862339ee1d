"""What a model family adapter tells the cache: where the blocks are, which
of a block's arguments are the hidden states it updates, and how to get the
block's cheap module input."""

from __future__ import annotations

from typing import Hashable

import torch


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Flatten each stream per sample and join them: estimators see one tensor
    of shape (batch, features) per module, whatever the block returns. The
    result is always a new tensor, so it survives blocks that update their
    inputs in place."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t[0].numel() for t in like]
    parts = torch.split(packed, sizes, dim=1)
    return [part.reshape(t.shape).to(t.dtype) for part, t in zip(parts, like)]


class BlockAdapter:
    """One per model family. Subclasses fill in the class attributes and
    `module_input`."""

    family: str = ""
    # Qualified names of the diffusion model classes this adapter handles;
    # subclasses of them match too.
    model_classes: tuple[str, ...] = ()
    # (patches_replace block kind, attribute of the diffusion model holding
    # those blocks, block arguments that are hidden states the block updates)
    block_groups: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, diffusion_model) -> bool:
        names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(diffusion_model).__mro__}
        return any(name in names for name in self.model_classes)

    def block_keys(self, diffusion_model) -> list[tuple[str, int]]:
        keys = []
        for kind, attribute, _ in self.block_groups:
            blocks = getattr(diffusion_model, attribute, None) or []
            keys.extend((kind, i) for i in range(len(blocks)))
        return keys

    def _group(self, kind: str) -> tuple[str, str, tuple[str, ...]]:
        for group in self.block_groups:
            if group[0] == kind:
                return group
        raise KeyError(kind)

    def streams(self, kind: str) -> tuple[str, ...]:
        return self._group(kind)[2]

    def block(self, diffusion_model, kind: str, index: int) -> torch.nn.Module:
        return getattr(diffusion_model, self._group(kind)[1])[index]

    def module_input(self, diffusion_model, kind: str, index: int, args: dict) -> torch.Tensor:
        raise NotImplementedError

    def chunk_key(self, kind: str, args: dict, transformer_options: dict) -> Hashable:
        """Identifies one chunk of an evaluation (cond and uncond batched or
        apart) so each keeps its own cached features."""
        first_stream = args[self.streams(kind)[0]]
        return tuple(transformer_options.get("cond_or_uncond") or ()), tuple(first_stream.shape)
