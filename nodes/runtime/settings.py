"""What an RFC Cache node attaches to a model, and the keys under which the
pack and the nodes it meets keep things in the transformer options."""

from __future__ import annotations

from ...rfc_core import CacheConfig
from ..adapters import BlockAdapter

WRAPPER_KEY = "rfc_cache"
SETTINGS_KEY = "rfc_cache_settings"
SESSION_KEY = "rfc_cache_session"
SUMMARY_EVENT = "rfc-cache.summary"
# Set by a sequence-parallel pack in the model's transformer options: a
# function that sums a tensor over the ranks that each hold a slice of the
# tokens (see rfc_core.run.RFCRun, docs/multi_gpu.md).
RANK_SUM_KEY = "rfc_cache_rank_sum"
MODEL_MODULE = "model"
# Where core's EasyCache and LazyCache nodes keep their state.
EASYCACHE_KEY = "easycache"
# Where Kandinsky 6's in-model MagCache finds its state (ComfyUI after v0.31).
K6_MAGCACHE_KEY = "k6_magcache"
# What core's MultiGPU node sets in the transformer options of each device's
# model call, run in a worker thread of its own.
MULTIGPU_THREAD_KEY = "multigpu_thread_device"
# Transformer options a sampler sets when it keeps state of its own across
# model calls, which a predicted call would corrupt: such runs are not cached.
SAMPLER_STATE_KEYS = {
    "ar_state": "the ar_video sampler keeps its own K/V cache across model calls and a predicted call would "
                "corrupt it",
}


class CacheSettings:
    """What an RFC Cache node attached to a model: fixed until re-applied.

    granularity "blocks": each transformer block is a cached module, through
    `adapter`; "model": the whole model call is the one cached module."""

    def __init__(self, config: CacheConfig, family: str, granularity: str, adapter: BlockAdapter | None,
                 first_module, node_id: str | None, adapts_short_runs: bool = False):
        """adapts_short_runs: a short run gets the measured few-step policy
        (session.config_for_short_run), as the nodes ask; code that sets
        every knob itself (the benchmarks) leaves it off."""
        self.config = config
        self.adapts_short_runs = adapts_short_runs
        self.family = family
        self.granularity = granularity
        self.adapter = adapter
        self.first_module = first_module
        self.node_id = node_id
        # What the cache put on the model's device, by the run's noise shape:
        # the next run with that shape reserves it while weights load
        # (wrappers.prepare_sampling_wrapper).
        self.device_cache_bytes: dict = {}
