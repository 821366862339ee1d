"""Driving an RFC cache from inside ComfyUI sampling.

Everything reaches ComfyUI through its extension points only:
- an OUTER_SAMPLE wrapper opens a `SamplingSession` for the run and closes
  it in `finally`, so an interrupted run leaves nothing behind;
- a CALC_COND_BATCH wrapper marks the start of each model evaluation (once per
  evaluation, however the conditionings are chunked);
- an APPLY_MODEL wrapper makes the session reachable from every block of
  the model call (some families pass blocks no transformer options) and, at
  whole-model granularity, is itself the cached module;
- a `patches_replace` entry per transformer block, or for families without
  one an object patch of the block's `forward`, predicts or computes it.
The session lives in a copy of the guider's model options made for this run,
so two runs, or two clones of one patched model, never share state.
"""

from __future__ import annotations

import inspect
import logging
import sys
from contextvars import ContextVar

import torch

from ..rfc_core import CacheConfig, RFCRun
from .adapters import BlockAdapter
from .adapters.base import pack, unpack

logger = logging.getLogger("ComfyUI-RFC")

WRAPPER_KEY = "rfc_cache"
SETTINGS_KEY = "rfc_cache_settings"
SESSION_KEY = "rfc_cache_session"
SUMMARY_EVENT = "rfc-cache.summary"
MODEL_MODULE = "model"


class CacheSettings:
    """What an RFC Cache node attached to a model: fixed until re-applied.

    granularity "blocks": each transformer block is a cached module, through
    `adapter`; "model": the whole model call is the one cached module."""

    def __init__(self, config: CacheConfig, family: str, granularity: str, adapter: BlockAdapter | None,
                 first_module, node_id: str | None):
        self.config = config
        self.family = family
        self.granularity = granularity
        self.adapter = adapter
        self.first_module = first_module
        self.node_id = node_id


def _copy_nested(options: dict) -> dict:
    """Copy the dicts and lists of model options, sharing everything else, so
    that adding the session for one run does not touch the model's own options."""
    copied = {}
    for key, value in options.items():
        if isinstance(value, dict):
            copied[key] = _copy_nested(value)
        elif isinstance(value, list):
            copied[key] = list(value)
        else:
            copied[key] = value
    return copied


def _skip_window(model_patcher, config: CacheConfig):
    model_sampling = model_patcher.get_model_object("model_sampling")
    return (float(model_sampling.percent_to_sigma(config.start_percent)),
            float(model_sampling.percent_to_sigma(config.end_percent)))


class SamplingSession:
    """One sampling run of one patched model."""

    def __init__(self, settings: CacheSettings, diffusion_model, skip_window):
        self.settings = settings
        self.adapter = settings.adapter
        self.diffusion_model = diffusion_model
        self.run = RFCRun(settings.config, settings.first_module, skip_window)
        # Streams each module actually returned (SD3's last block returns no
        # text stream); only those are cached and predicted.
        self.returned_streams: dict = {}
        self.failed = False

    def start_evaluation(self, sigma: float) -> None:
        if not self.failed:
            self.run.start_evaluation(sigma)

    def fail(self, where: str) -> None:
        """Caching broke: compute everything for the rest of the run, say so once."""
        if not self.failed:
            logger.exception("RFC: caching failed while %s; computing every block for the rest of this run", where)
        self.failed = True
        self.run.finish()

    def run_block(self, kind: str, index: int, args: dict, compute, transformer_options: dict) -> dict:
        """Predict or compute one block. `compute(args)` runs the real block and
        returns its streams by name; the result has the same form."""
        group = self.adapter.group(kind)
        module_key = (kind, index)
        try:
            chunk_key = self.adapter.chunk_key(kind, args, transformer_options)
            module_input = None
            if self.run.needs_module_input(module_key):
                # Estimators take per-sample norms over everything but dim 0.
                module_input = self.adapter.module_input(self.diffusion_model, kind, index, args)
                module_input = module_input.movedim(group.batch_dim, 0)
            names = self.returned_streams.get(module_key, group.streams)
            inputs = [args[name] for name in names]
            packed_input = pack(inputs, group.batch_dim)
            residual = self.run.predict(chunk_key, module_key, module_input)
            if residual is not None:
                predicted = dict(zip(names, unpack(packed_input + residual, inputs, group.batch_dim)))
                return {name: predicted.get(name) for name in group.streams}
        except Exception:
            self.fail(f"predicting {kind} {index}")
            return compute(args)
        output = compute(args)
        try:
            returned = tuple(name for name in group.streams if output.get(name) is not None)
            if returned != names:
                self.returned_streams[module_key] = returned
                packed_input = _select_streams(packed_input, inputs, names, returned, group.batch_dim)
            packed_output = pack([output[name] for name in returned], group.batch_dim)
            self.run.record(chunk_key, module_key, module_input, packed_output - packed_input)
        except Exception:
            self.fail(f"recording {kind} {index}")
        return output

    def run_model(self, compute, x, transformer_options: dict):
        """Whole-model granularity: the model call is the one cached module,
        the noisy latent its input, the denoised latent minus it the residual."""
        try:
            chunk_key = (tuple(transformer_options.get("cond_or_uncond") or ()), tuple(x.shape))
            module_input = x.detach().clone()
            residual = self.run.predict(chunk_key, MODEL_MODULE, module_input)
            if residual is not None:
                return unpack(pack([x]) + residual, [x])[0]
        except Exception:
            self.fail("predicting the model output")
            return compute()
        output = compute()
        try:
            # A model whose output is not shaped like its input (none of
            # ComfyUI's today) is cached as its plain output.
            packed_output = pack([output])
            if output.shape == x.shape:
                packed_output = packed_output - pack([x]).to(packed_output.dtype)
            self.run.record(chunk_key, MODEL_MODULE, module_input, packed_output)
        except Exception:
            self.fail("recording the model output")
        return output

    def finish(self) -> str:
        self.run.finish()
        self.returned_streams.clear()
        summary = f"RFC on {self.settings.family} ({self.settings.granularity}): {self.run.summary()}"
        if self.failed:
            summary += " (caching failed part-way; the rest was computed in full)"
        logger.info("%s", summary)
        _send_summary(self.settings.node_id, summary)
        return summary


def _select_streams(packed: torch.Tensor, inputs: list[torch.Tensor], names, keep, batch_dim: int) -> torch.Tensor:
    parts = torch.split(packed, [t.numel() // t.shape[batch_dim] for t in inputs], dim=1)
    return torch.cat([part for name, part in zip(names, parts) if name in keep], dim=1)


def _send_summary(node_id: str | None, summary: str) -> None:
    """Show the summary on the node when a browser is listening; without a
    server (headless use, tests) there is nobody to tell."""
    server_module = sys.modules.get("server")
    prompt_server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if node_id is None or prompt_server is None:
        return
    try:
        prompt_server.send_sync(SUMMARY_EVENT, {"node": node_id, "summary": summary})
    except Exception:
        logger.debug("RFC: could not send the summary to the front-end", exc_info=True)


# The session and the transformer options of the model call in progress. Set
# by the APPLY_MODEL wrapper, so blocks of families whose block arguments
# carry no transformer options (HunyuanDiT, Wan S2V, PixArt, object-patched
# blocks) still find their session.
_ACTIVE_CALL: ContextVar[tuple[SamplingSession, dict] | None] = ContextVar("rfc_active_call", default=None)


def _session_for(args: dict) -> tuple[SamplingSession | None, dict]:
    transformer_options = args.get("transformer_options")
    if isinstance(transformer_options, dict) and SESSION_KEY in transformer_options:
        return transformer_options[SESSION_KEY], transformer_options
    active = _ACTIVE_CALL.get()
    if active is None:
        return None, {}
    return active


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
        session, transformer_options = _session_for(args)
        if session is None or session.failed or session.settings.granularity != "blocks":
            return compute(args)
        return session.run_block(self.kind, self.index, args, compute, transformer_options)


class CachedForward:
    """The object patch that replaces one block's `forward` in families
    without a block patch point. ComfyUI restores the original on unpatch."""

    def __init__(self, kind: str, index: int, outputs: tuple[str, ...], original):
        self.kind = kind
        self.index = index
        self.outputs = outputs
        # The block's own forward, or another object patch this model
        # already had on it, which we then run in its place.
        self.original = original
        self.signature = inspect.signature(original)

    def __call__(self, *args, **kwargs):
        session, transformer_options = _ACTIVE_CALL.get() or (None, {})
        if session is None or session.failed or session.settings.granularity != "blocks":
            return self.original(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()

        def compute(_):
            returned = self.original(*bound.args, **bound.kwargs)
            if len(self.outputs) == 1:
                return {self.outputs[0]: returned}
            return dict(zip(self.outputs, returned))

        streams = session.run_block(self.kind, self.index, bound.arguments, compute, transformer_options)
        if len(self.outputs) == 1:
            return streams[self.outputs[0]]
        return tuple(streams[name] for name in self.outputs)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    transformer_options = original_options.get("transformer_options", {})
    settings: CacheSettings | None = transformer_options.get(SETTINGS_KEY)
    if settings is None or SESSION_KEY in transformer_options:
        return executor(*args, **kwargs)
    if not settings.config.skipping_enabled:
        logger.info("RFC: threshold, max_skip or interval is set to never skip; every evaluation is computed")
        return executor(*args, **kwargs)
    session = None
    try:
        model_patcher = guider.model_patcher
        session = SamplingSession(settings, model_patcher.model.diffusion_model,
                                  _skip_window(model_patcher, settings.config))
        guider.model_options = _copy_nested(original_options)
        guider.model_options.setdefault("transformer_options", {})[SESSION_KEY] = session
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        if session is not None:
            session.finish()


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    model_options = kwargs.get("model_options", args[-1] if args else {})
    session: SamplingSession | None = model_options.get("transformer_options", {}).get(SESSION_KEY)
    if session is not None:
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        try:
            session.start_evaluation(float(timestep.flatten()[0]))
        except Exception:
            session.fail("reading the timestep")
    return executor(*args, **kwargs)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    transformer_options = transformer_options if transformer_options is not None else {}
    session: SamplingSession | None = transformer_options.get(SESSION_KEY)

    def compute():
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    if session is None or session.failed:
        return compute()
    token = _ACTIVE_CALL.set((session, transformer_options))
    try:
        if session.settings.granularity == "model":
            return session.run_model(compute, x, transformer_options)
        return compute()
    finally:
        _ACTIVE_CALL.reset(token)
