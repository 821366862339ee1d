"""The RFC Cache nodes: validate widgets, clone the model, attach the cache."""

from __future__ import annotations

import logging

from ..rfc_core import ESTIMATORS, RANGES, SCHEDULERS, CacheConfig
from .adapters import detect_adapter, supported_families
from .runtime import (SETTINGS_KEY, WRAPPER_KEY, CacheSettings, CachedBlock, calc_cond_batch_wrapper,
                      outer_sample_wrapper)

logger = logging.getLogger("ComfyUI-RFC")

# Measured defaults: see README "Choosing the defaults".
DEFAULTS = CacheConfig()


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

ADVANCED_INPUTS = {
    "estimator": (list(ESTIMATORS), {"default": DEFAULTS.estimator,
                                     "tooltip": "rfe: RFC's relational estimate; taylor: TaylorSeer; reuse: FORA."}),
    "scheduler": (list(SCHEDULERS), {"default": DEFAULTS.scheduler,
                                     "tooltip": "rcs: compute when the input forecast error adds up past the "
                                                "threshold; fixed: compute every `interval` evaluations."}),
    "interval": _int_widget("interval", DEFAULTS.interval, "For the fixed scheduler: one full computation every N."),
}


def apply_rfc_cache(model, config: CacheConfig, node_id: str | None = None):
    """Return a clone of `model` whose transformer blocks are cached by RFC."""
    from comfy.patcher_extension import WrappersMP

    diffusion_model = model.model.diffusion_model
    adapter = detect_adapter(diffusion_model)
    if adapter is None:
        logger.warning("RFC: %s is not supported yet (supported: %s); the model is returned unchanged",
                       type(diffusion_model).__name__, ", ".join(supported_families()))
        return model
    block_keys = adapter.block_keys(diffusion_model)
    patched = model.clone()
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    transformer_options[SETTINGS_KEY] = CacheSettings(config, adapter, block_keys[0], node_id)
    for wrapper_type, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                                  (WrappersMP.CALC_COND_BATCH, calc_cond_batch_wrapper)):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    existing = transformer_options.get("patches_replace", {}).get("dit", {})
    for kind, index in block_keys:
        chained = existing.get((kind, index))
        if isinstance(chained, CachedBlock):  # RFC applied again: replace ourselves, keep what we chained
            chained = chained.chained
        patched.set_model_patch_replace(CachedBlock(kind, index, chained), "dit", kind, index)
    logger.info("RFC: %s model, %d blocks cached, %s", adapter.family, len(block_keys), config.describe())
    return patched


class RFCCache:
    DESCRIPTION = ("Relational Feature Caching: skips transformer block computations on model evaluations where "
                   "they can be predicted from earlier ones. Place between the model loader and the sampler.")
    CATEGORY = "model_patches/RFC"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(BASIC_INPUTS), "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, unique_id=None, **widgets):
        return (apply_rfc_cache(model, CacheConfig(**widgets), unique_id),)


class RFCCacheAdvanced(RFCCache):
    DESCRIPTION = ("RFC Cache with the estimator and scheduler exposed, so FORA (reuse + fixed), TaylorSeer "
                   "(taylor + fixed) and RFC (rfe + rcs) can be compared from one node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**BASIC_INPUTS, **ADVANCED_INPUTS}, "hidden": {"unique_id": "UNIQUE_ID"}}


NODE_CLASS_MAPPINGS = {"RFCCache": RFCCache, "RFCCacheAdvanced": RFCCacheAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {"RFCCache": "RFC Cache", "RFCCacheAdvanced": "RFC Cache (Advanced)"}
