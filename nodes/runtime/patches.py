"""The block hooks: a `patches_replace` entry per block, or an object patch
of its forward, and what keeps them in place when other nodes patch the
same blocks."""

from __future__ import annotations

import functools
import inspect
import types

import torch

from ..adapters import REPLACE, BlockAdapter
from .active_call import _ACTIVE_CALL, session_for
from .settings import CacheSettings


class CachedBlock:
    """The `patches_replace` entry of one transformer block."""

    def __init__(self, kind: str, index: int, chained=None):
        self.kind = kind
        self.index = index
        # Another pack's patch that was on this block before us: we run it
        # in place of the original block rather than dropping it.
        self.chained = chained

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        if self.chained is None:
            compute = original
        else:
            def compute(block_args):
                return self.chained(block_args, extra)
        session, transformer_options = session_for(args)
        if session is None or not session.caches_blocks:
            return compute(args)
        return session.run_block(self.kind, self.index, args, compute, transformer_options)


class CachedForward:
    """The object patch that replaces one block's `forward` in families
    without a block patch point. ComfyUI restores the original on unpatch."""

    def __init__(self, kind: str, index: int, outputs: tuple[str, ...], original, block_forward=None,
                 block_path: str | None = None):
        self.kind = kind
        self.index = index
        self.outputs = outputs
        # The block's own forward, or another object patch this model
        # already had on it, which we then run in its place.
        self.original = original
        # Arguments are named by the block's own forward: a patch we chain
        # usually takes (*args, **kwargs).
        self.signature = inspect.signature(block_forward if block_forward is not None else original)
        # Where every parameter is positional-or-keyword (no *args, **kwargs
        # or keyword-only ones), a call binds with a zip on the hot path
        # instead of Signature.bind; anything else takes Signature.bind.
        parameters = list(self.signature.parameters.values())
        self._names = (tuple(p.name for p in parameters)
                       if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters) else None)
        self._defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        # Where the block is under the diffusion model: a MultiGPU clone gets
        # this same object patch, and must run its own block, not ours.
        self.block_path = block_path

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by parameter name, defaults filled in, in
        the parameters' order: Signature.bind's arguments after apply_defaults."""
        names = self._names
        if names is not None and len(args) <= len(names) and all(name in self._defaults or name in kwargs
                                                                 for name in names[len(args):]):
            if not kwargs and len(args) == len(names):
                return dict(zip(names, args))
            if all(name in names[len(args):] for name in kwargs):
                arguments = dict(zip(names, args))
                for name in names[len(args):]:
                    arguments[name] = kwargs[name] if name in kwargs else self._defaults[name]
                return arguments
        bound = self.signature.bind(*args, **kwargs)  # raises as the block would, for a call that does not fit
        bound.apply_defaults()
        return bound.arguments

    def _forward(self, diffusion_model):
        original = self.original
        owner = getattr(original, "__self__", None)
        if diffusion_model is None or self.block_path is None or not isinstance(owner, torch.nn.Module):
            return original
        block = diffusion_model.get_submodule(self.block_path)
        return original if block is owner else types.MethodType(original.__func__, block)

    def __call__(self, *args, **kwargs):
        active = _ACTIVE_CALL.get()
        forward = self._forward(None if active is None else active.diffusion_model)
        session = None if active is None else active.session
        if session is None or not session.caches_blocks:
            return forward(*args, **kwargs)
        arguments = self._bind(args, kwargs)

        def compute(_):
            # The block's own arguments as passed: what binding them named.
            returned = forward(*args, **kwargs)
            if len(self.outputs) == 1:
                return {self.outputs[0]: returned}
            return dict(zip(self.outputs, returned))

        streams = session.run_block(self.kind, self.index, arguments, compute, active.transformer_options)
        if len(self.outputs) == 1:
            return streams[self.outputs[0]]
        return tuple(streams[name] for name in self.outputs)


def forward_patch_key(adapter: BlockAdapter, diffusion_model, kind: str, index: int) -> str:
    """The ModelPatcher object-patch key of a block's forward."""
    return f"diffusion_model.{adapter.block_path(diffusion_model, kind, index)}.forward"


def _holds_cached_block(patch) -> bool:
    """Whether a patch keeps one of our entries (in its closure, default
    arguments, attributes, or a functools.partial's arguments): a patch built
    to wrap the entry it found, which it then calls in place of the block."""
    held = []
    for cell in getattr(patch, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # a free variable not assigned yet
            continue
    held += list(getattr(patch, "__defaults__", None) or ())
    held += list((getattr(patch, "__kwdefaults__", None) or {}).values())
    held += list(getattr(patch, "__dict__", {}).values())
    held += list(getattr(getattr(patch, "__self__", None), "__dict__", {}).values())
    if isinstance(patch, functools.partial):
        held += [patch.func, *patch.args, *patch.keywords.values()]
    return any(isinstance(item, CachedBlock) for item in held)


def chain_patches_added_later(run_options: dict, settings: CacheSettings, diffusion_model) -> None:
    """A node applied after RFC Cache that sets `patches_replace` on a block
    replaces our entry. If its patch wraps ours, the block still reaches the
    cache through it and it runs around the cache on every evaluation.
    Otherwise, for this run's options only, ours is put back around it,
    chained as if that node had been applied first."""
    replaced = run_options.get("transformer_options", {}).get("patches_replace", {}).get("dit")
    if not replaced:
        return
    for kind, index in settings.adapter.block_keys(diffusion_model):
        patch = replaced.get((kind, index))
        if (settings.adapter.group(kind).hook == REPLACE and patch is not None
                and not isinstance(patch, CachedBlock) and not _holds_cached_block(patch)):
            replaced[(kind, index)] = CachedBlock(kind, index, patch)


def forwards_replaced_later(model_patcher, settings: CacheSettings, diffusion_model) -> dict:
    """Blocks whose forward object patch is no longer ours: a node applied
    after RFC Cache patched it again. If that patch wraps ours (as one built
    on `get_model_object` does) the block still reaches the cache; if not,
    RFC never sees the block, which `SamplingSession.finish` reports. The
    patcher's object patches belong to that node, so they are left alone."""
    replaced = {}
    for kind, index in settings.adapter.block_keys(diffusion_model):
        if settings.adapter.group(kind).hook == REPLACE:
            continue
        path = forward_patch_key(settings.adapter, diffusion_model, kind, index)
        if not isinstance(model_patcher.object_patches.get(path), CachedForward):
            replaced[(kind, index)] = path
    return replaced
