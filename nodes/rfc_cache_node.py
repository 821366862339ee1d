"""The RFC Cache nodes: validate widgets, clone the model, attach the cache."""

from __future__ import annotations

import logging
import types

from ..rfc_core import CACHE_DEVICES, CACHE_DTYPES, ESTIMATORS, RANGES, SCHEDULERS, CacheConfig
from .adapters import REPLACE, BlockAdapter, detect_adapter, supported_families
from .runtime import (MODEL_MODULE, SETTINGS_KEY, WRAPPER_KEY, CacheSettings, CachedBlock, CachedForward,
                      apply_model_wrapper, calc_cond_batch_wrapper, forward_patch_key, outer_sample_wrapper,
                      prepare_sampling_wrapper, refuse_other_cache)

logger = logging.getLogger("ComfyUI-RFC")

# Measured defaults: see docs/benchmark.md "Choosing the defaults".
DEFAULTS = CacheConfig()
# auto: each transformer block where the family has an adapter, else the
# whole model call; model: always the whole model call.
GRANULARITIES = ("auto", "model")
# auto: a short run (at most 10 steps ending the image) is left uncached
# below 6 steps and gets the few-step mode from 6 (session.config_for_short_run);
# as set: the widgets as they are, at any step count.
SHORT_RUNS = ("auto", "as set")


def _float_widget(name: str, default: float, step: float, tooltip: str):
    low, high = RANGES[name]
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


def _int_widget(name: str, default: int, tooltip: str):
    low, high = RANGES[name]
    return ("INT", {"default": default, "min": low, "max": high, "tooltip": tooltip})


BASIC_INPUTS = {
    "model": ("MODEL", {"tooltip": "The diffusion model to accelerate; the input model is left untouched."}),
    "threshold": _float_widget("threshold", DEFAULTS.threshold, 0.01,
                               "How much forecast error of the first block's input may accumulate before a "
                               "full computation. Higher is faster. 0 never skips."),
    "max_skip": _int_widget("max_skip", DEFAULTS.max_skip,
                            "Most model evaluations in a row that may be predicted. 0 never skips."),
    "order": _int_widget("order", DEFAULTS.order, "Taylor order of the forecasts: 0 reuse, 1 linear, 2 quadratic."),
    "start_percent": _float_widget("start_percent", DEFAULTS.start_percent, 0.01,
                                   "Skipping may start this far into sampling."),
    "end_percent": _float_widget("end_percent", DEFAULTS.end_percent, 0.01,
                                 "Skipping stops this far into sampling."),
}

# Widgets added after the first release come last, so that the positional
# widget values of saved workflows still land on the widgets they were for.
TARGET_INPUTS = {
    "target_speedup": _float_widget("target_speedup", DEFAULTS.target_speedup, 0.1,
                                    "0: off, the threshold decides. Otherwise about one full computation per this "
                                    "many model evaluations (2.5 computes 20 of 50), placed where the forecast "
                                    "error is largest; the threshold is then ignored. Needs max_skip of at "
                                    "least target_speedup - 1."),
}

MEMORY_INPUTS = {
    "cache_device": (list(CACHE_DEVICES), {"default": DEFAULTS.cache_device,
                                           "tooltip": "Where cached features are kept. auto: on the model's device "
                                                      "while the cache fits beside the step there, else system "
                                                      "memory; cpu: system memory, slower but frees VRAM."}),
    "cache_dtype": (list(CACHE_DTYPES), {"default": DEFAULTS.cache_dtype,
                                         "tooltip": "dtype of cached features. auto: the model's, or int8 where the "
                                                    "cache must shrink to fit; int8: about half a bf16 cache; "
                                                    "float16 or bfloat16 halve a float32 model's cache."}),
}

# After short_runs: widgets added later come last (see TARGET_INPUTS).
MEMORY_PLAN_INPUTS = {
    "cache_span": _int_widget("cache_span", DEFAULTS.cache_span,
                              "Consecutive blocks cached as one unit. 0: auto, per block where the cache fits, "
                              "else the shortest span that does. 2 halves the cache."),
    "memory_budget": _float_widget("memory_budget", DEFAULTS.memory_budget, 0.01,
                                   "Most GB the whole cache may take, wherever it is kept. 0: auto, what the GPU "
                                   "can give beside the step, then system memory."),
}

SHORT_RUN_INPUTS = {
    "short_runs": (list(SHORT_RUNS), {"default": "auto",
                                      "tooltip": "Runs of at most 10 steps that end the image (turbo and lightning "
                                                 "models). auto: below 6 steps left uncached (fewer plain steps do "
                                                 "better), from 6 the few-step mode (the first third of the blocks "
                                                 "computed in every evaluation, max_skip 1). as set: the widgets "
                                                 "as they are."}),
}

ADVANCED_INPUTS = {
    "estimator": (list(ESTIMATORS), {"default": DEFAULTS.estimator,
                                     "tooltip": "rfe: RFC's relational estimate; taylor: TaylorSeer; reuse: FORA."}),
    "scheduler": (list(SCHEDULERS), {"default": DEFAULTS.scheduler,
                                     "tooltip": "rcs: compute when the input forecast error adds up past the "
                                                "threshold; fixed: compute every `interval` evaluations."}),
    "interval": _int_widget("interval", DEFAULTS.interval, "For the fixed scheduler: one full computation every N."),
    "granularity": (list(GRANULARITIES), {"default": "auto",
                                          "tooltip": "What is cached. auto: each transformer block where the model "
                                                     "family is supported, else the whole model call. model: "
                                                     "always the whole model call."}),
}


def _describe_model(diffusion_model) -> str:
    return type(diffusion_model).__name__


def apply_rfc_cache(model, config: CacheConfig, node_id: str | None = None, granularity: str = "auto",
                    adapts_short_runs: bool = True):
    """Return a clone of `model` cached by RFC: per transformer block where the
    family has an adapter, otherwise the whole model call as one module.
    adapts_short_runs: a short run gets the few-step policy (short_runs "auto")."""
    from comfy.patcher_extension import WrappersMP

    if granularity not in GRANULARITIES:
        raise ValueError(f"RFC Cache: 'granularity' must be one of {list(GRANULARITIES)}, got {granularity!r}")
    # EasyCache applied after this node is refused when sampling starts.
    refuse_other_cache(model.model_options.get("transformer_options", {}))
    diffusion_model = model.model.diffusion_model
    adapter = detect_adapter(diffusion_model)
    block_keys = adapter.block_keys(diffusion_model) if adapter is not None else []
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})
    if granularity != "model" and block_keys:
        settings = CacheSettings(config, adapter.family, "blocks", adapter, adapter.module_keys(diffusion_model)[0],
                                 node_id, adapts_short_runs)
        hooks = _patch_blocks(patched, adapter, block_keys)
        logger.info("RFC: %s (%s), granularity blocks: %d blocks through %s; %s", adapter.family,
                    _describe_model(diffusion_model), len(block_keys), hooks, config.describe())
    else:
        family = adapter.family if adapter is not None else _describe_model(diffusion_model)
        settings = CacheSettings(config, family, "model", None, MODEL_MODULE, node_id, adapts_short_runs)
        if granularity == "model":
            reason = "as asked"
        else:
            reason = (f"no block adapter for it (block-level families: {', '.join(supported_families())})"
                      if adapter is None else "its adapter found no blocks")
        logger.info("RFC: %s, granularity model: the whole model call is cached, %s; %s", family, reason,
                    config.describe())
    # Set last: ComfyUI replaces the transformer options dict when a patch is added.
    patched.model_options["transformer_options"][SETTINGS_KEY] = settings
    for wrapper_type, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                                  (WrappersMP.PREPARE_SAMPLING, prepare_sampling_wrapper),
                                  (WrappersMP.CALC_COND_BATCH, calc_cond_batch_wrapper),
                                  (WrappersMP.APPLY_MODEL, apply_model_wrapper)):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    return patched


def _patch_blocks(patched, adapter: BlockAdapter, block_keys) -> str:
    """Hook every block: `patches_replace` where the family has it, else an
    object patch of the block's forward. Returns how, for the log."""
    diffusion_model = patched.model.diffusion_model
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    hooks = set()
    for kind, index in block_keys:
        group = adapter.group(kind)
        if group.hook == REPLACE:
            chained = existing.get((kind, index))
            if isinstance(chained, CachedBlock):  # RFC applied again: replace ourselves, keep what we chained
                chained = chained.chained
            patched.set_model_patch_replace(CachedBlock(kind, index, chained), "dit", kind, index)
            hooks.add(f'patches_replace["dit"]["{kind}"]')
        else:
            path = forward_patch_key(adapter, diffusion_model, kind, index)
            # The class's forward bound to the block, not whatever the shared
            # module holds right now: another clone's patches may be applied
            # to it at this moment.
            block = adapter.block(diffusion_model, kind, index)
            block_forward = types.MethodType(type(block).forward, block)
            original = patched.object_patches.get(path)
            if isinstance(original, CachedForward):
                original = original.original
            if original is None:
                original = block_forward
            patched.add_object_patch(path, CachedForward(kind, index, group.returned, original, block_forward,
                                                         adapter.block_path(diffusion_model, kind, index)))
            hooks.add(f"object patches of {group.attribute}[i].forward")
    return " and ".join(sorted(hooks))


class RFCCache:
    DESCRIPTION = ("Relational Feature Caching: skips transformer block computations on model evaluations where "
                   "they can be predicted from earlier ones. Place between the model loader and the sampler.")
    CATEGORY = "model_patches/RFC"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with RFC caching attached: connect it to the sampler.",)
    # Shown by the node search of ComfyUI v0.29 and newer; older versions ignore it.
    SEARCH_ALIASES = ["cache", "speed up", "faster sampling", "step cache", "teacache", "taylorseer",
                      "first block cache", "relational feature caching"]
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**BASIC_INPUTS, **TARGET_INPUTS}, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, unique_id=None, granularity="auto", short_runs="auto", **widgets):
        if short_runs not in SHORT_RUNS:
            raise ValueError(f"RFC Cache: 'short_runs' must be one of {list(SHORT_RUNS)}, got {short_runs!r}")
        return (apply_rfc_cache(model, CacheConfig(**widgets), unique_id, granularity, short_runs == "auto"),)


class RFCCacheAdvanced(RFCCache):
    DESCRIPTION = ("RFC Cache with the estimator and scheduler exposed, so FORA (reuse + fixed), TaylorSeer "
                   "(taylor + fixed) and RFC (rfe + rcs) can be compared from one node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**BASIC_INPUTS, **ADVANCED_INPUTS, **TARGET_INPUTS, **MEMORY_INPUTS,
                             **SHORT_RUN_INPUTS, **MEMORY_PLAN_INPUTS},
                "hidden": {"unique_id": "UNIQUE_ID"}}


NODE_CLASS_MAPPINGS = {"RFCCache": RFCCache, "RFCCacheAdvanced": RFCCacheAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {"RFCCache": "RFC Cache", "RFCCacheAdvanced": "RFC Cache (Advanced)"}
