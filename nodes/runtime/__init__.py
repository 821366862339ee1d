"""Driving an RFC cache from inside ComfyUI sampling.

Everything reaches ComfyUI through its extension points only:
- an OUTER_SAMPLE wrapper opens a `SamplingSession` for the run and closes
  it in `finally`, so an interrupted run leaves nothing behind;
- a PREPARE_SAMPLING wrapper reads ComfyUI's memory estimate for a step,
  which the cache is planned beside (memory.py, rfc_core.memory), and keeps
  an earlier run's device cache free while weights load;
- a CALC_COND_BATCH wrapper marks the start of each model evaluation (once per
  evaluation, however the conditionings are chunked) and checks its output;
- an APPLY_MODEL wrapper makes the session reachable from every block of
  the model call (some families pass blocks no transformer options) and, at
  whole-model granularity, is itself the cached module;
- a `patches_replace` entry per transformer block, or for families without
  one an object patch of the block's `forward`, predicts or computes it.
The session lives in a copy of the guider's model options made for this run,
so two runs, or two clones of one patched model, never share state.

Faults never cost the image:
- an exception inside the cache logic is logged once, with the traceback at
  DEBUG; block caching falls back to caching the whole model call, and a
  fault there computes the rest of the run in full (the block or call that
  raised is computed too);
- inf or NaN from the cache never reaches the sampler. Nothing is checked
  per block (a check there is a host sync per block); instead the output of
  every evaluation that used predictions is checked once, and if it is not
  finite that evaluation is computed again in full and every cached module
  holding inf or NaN is dropped. Said once per run, as a warning. A NaN the
  model itself makes is the model's: the uncached run has it too.

Where each part is:
- settings.py: what a node attaches (CacheSettings) and the transformer
  options keys the pack and the nodes it meets use;
- wrappers.py: the three wrappers, starting and ending a run, and refusing
  a second cache on the model;
- session.py: one run (SamplingSession): the decision, each cached block or
  model call, faults, what a sampler changes, the summary;
- patches.py: the block hooks and how they stay in place beside other
  nodes' patches;
- memory.py: what memory a run's cache may take, from ComfyUI's queries;
- active_call.py: the model call in progress on this thread;
- summary.py: the run as the front-end draws it.
"""

from .active_call import _ACTIVE_CALL, ActiveCall, active_diffusion_model
from .patches import CachedBlock, CachedForward, forward_patch_key
from .session import SamplingSession, rebuild_leaves, tensor_leaves
from .settings import (EASYCACHE_KEY, K6_MAGCACHE_KEY, MODEL_MODULE, MULTIGPU_THREAD_KEY, RANK_SUM_KEY,
                       SAMPLER_STATE_KEYS, SESSION_KEY, SETTINGS_KEY, SUMMARY_EVENT, WRAPPER_KEY, CacheSettings)
from .summary import summary_message
from .wrappers import (apply_model_wrapper, calc_cond_batch_wrapper, outer_sample_wrapper, prepare_sampling_wrapper,
                       refuse_other_cache)
from ...rfc_core import RFCRun

__all__ = ["_ACTIVE_CALL", "ActiveCall", "active_diffusion_model", "CachedBlock", "CachedForward", "forward_patch_key",
           "SamplingSession", "rebuild_leaves", "tensor_leaves", "EASYCACHE_KEY", "K6_MAGCACHE_KEY", "MODEL_MODULE",
           "MULTIGPU_THREAD_KEY", "RANK_SUM_KEY", "SAMPLER_STATE_KEYS", "SESSION_KEY", "SETTINGS_KEY",
           "SUMMARY_EVENT", "WRAPPER_KEY", "CacheSettings", "summary_message", "apply_model_wrapper",
           "calc_cond_batch_wrapper", "prepare_sampling_wrapper", "outer_sample_wrapper", "refuse_other_cache", "RFCRun"]
