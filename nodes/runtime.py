"""Driving an RFC cache from inside ComfyUI sampling.

Everything reaches ComfyUI through its extension points only:
- an OUTER_SAMPLE wrapper opens a `SamplingSession` for the run and closes
  it in `finally`, so an interrupted run leaves nothing behind;
- a CALC_COND_BATCH wrapper marks the start of each model evaluation (once per
  evaluation, however the conditionings are chunked);
- a `patches_replace` entry per transformer block predicts or computes it.
The session lives in a copy of the guider's model options made for this run,
so two runs, or two clones of one patched model, never share state.
"""

from __future__ import annotations

import logging
import sys

from ..rfc_core import CacheConfig, RFCRun
from .adapters import BlockAdapter
from .adapters.base import pack, unpack

logger = logging.getLogger("ComfyUI-RFC")

WRAPPER_KEY = "rfc_cache"
SETTINGS_KEY = "rfc_cache_settings"
SESSION_KEY = "rfc_cache_session"
SUMMARY_EVENT = "rfc-cache.summary"


class CacheSettings:
    """What an RFC Cache node attached to a model: fixed until re-applied."""

    def __init__(self, config: CacheConfig, adapter: BlockAdapter, first_module, node_id: str | None):
        self.config = config
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
        adapter = self.adapter
        module_key = (kind, index)
        streams = [args[name] for name in adapter.streams(kind)]
        try:
            chunk_key = adapter.chunk_key(kind, args, transformer_options)
            module_input = (adapter.module_input(self.diffusion_model, kind, index, args)
                            if self.run.needs_module_input(module_key) else None)
            packed_input = pack(streams)
            residual = self.run.predict(chunk_key, module_key, module_input)
            if residual is not None:
                predicted = unpack(packed_input + residual, streams)
                return dict(zip(adapter.streams(kind), predicted))
        except Exception:
            self.fail(f"predicting {kind} {index}")
            return compute(args)
        output = compute(args)
        try:
            packed_output = pack([output[name] for name in adapter.streams(kind)])
            self.run.record(chunk_key, module_key, module_input, packed_output - packed_input)
        except Exception:
            self.fail(f"recording {kind} {index}")
        return output

    def finish(self) -> str:
        self.run.finish()
        summary = f"RFC on {self.adapter.family}: {self.run.summary()}"
        if self.failed:
            summary += " (caching failed part-way; the rest was computed in full)"
        logger.info("%s", summary)
        _send_summary(self.settings.node_id, summary)
        return summary


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
        transformer_options = args.get("transformer_options") or {}
        session = transformer_options.get(SESSION_KEY)
        if session is None or session.failed:
            return compute(args)
        return session.run_block(self.kind, self.index, args, compute, transformer_options)


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
