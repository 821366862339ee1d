"""The wrappers that drive a run: OUTER_SAMPLE opens a SamplingSession and
closes it in `finally`, CALC_COND_BATCH marks each model evaluation,
APPLY_MODEL makes the session reachable from every block (and is the cached
module at whole-model granularity)."""

from __future__ import annotations

import logging

from ...rfc_core import CacheConfig, RFCRun
from ..adapters.base import ALTERED_PASS_KEYS
from .active_call import _ACTIVE_CALL, ActiveCall
from .memory import reserved_for_loading, step_estimate
from .patches import chain_patches_added_later, forwards_replaced_later
from .session import SamplingSession
from .settings import (EASYCACHE_KEY, K6_MAGCACHE_KEY, MULTIGPU_THREAD_KEY, RANK_SUM_KEY, SAMPLER_STATE_KEYS,
                       SESSION_KEY, SETTINGS_KEY, CacheSettings)

logger = logging.getLogger("ComfyUI-RFC")


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


def refuse_other_cache(transformer_options: dict) -> None:
    """Core's EasyCache or LazyCache, or Kandinsky 6's own MagCache, on the
    same model skips whole model calls (or every block of one) on its own
    schedule while RFC skips blocks on its own: each would judge its error
    from outputs the other already approximated, and the two errors
    compound. Refused in either order, before anything is computed."""
    if EASYCACHE_KEY in transformer_options:
        other = f"core's {getattr(transformer_options[EASYCACHE_KEY], 'name', 'EasyCache')} node"
    elif K6_MAGCACHE_KEY in transformer_options:
        other = "Kandinsky 6's MagCache (transformer_options['k6_magcache'])"
    else:
        return
    raise ValueError(f"RFC Cache: this model also has {other}. Two caches on one model skip on their own "
                     f"schedules and compound their errors; remove one of them.")


def _warn_unreachable_target(run: RFCRun) -> None:
    target = run.config.target_speedup
    best = run.best_speedup()
    if target and best is not None and best < target / 1.1:
        logger.warning("RFC: target_speedup %g cannot be reached in %d steps: max_skip %d, the start/end window, "
                       "%d warm-up computations and a short run's last step allow at most %.2fx", target,
                       len(run.plan.step_sigmas), run.config.max_skip, run.config.warmup, best)
    elif target and run.rounded_target():
        logger.info("RFC: target_speedup %g: %s", target, run.rounded_target())


def _start_session(guider, settings: CacheSettings, sigmas, sampler_name: str) -> tuple[SamplingSession, dict]:
    model_patcher = guider.model_patcher
    diffusion_model = model_patcher.model.diffusion_model
    schedule = None if sigmas is None else [float(s) for s in sigmas.flatten()]
    rank_sum = guider.model_options.get("transformer_options", {}).get(RANK_SUM_KEY)
    session = SamplingSession(settings, diffusion_model, _skip_window(model_patcher, settings.config), schedule,
                              rank_sum, sampler_name)
    if session.config_note:
        logger.info("RFC: %s", session.config_note)
    _warn_unreachable_target(session.run)
    run_options = _copy_nested(guider.model_options)
    run_options.setdefault("transformer_options", {})[SESSION_KEY] = session
    if settings.granularity == "blocks":
        chain_patches_added_later(run_options, settings, diffusion_model)
        session.unseen_blocks = forwards_replaced_later(model_patcher, settings, diffusion_model)
    return session, run_options


def sampler_name_of(sampler) -> str:
    """The sampler's function name (sample_euler_ancestral), for the run's
    noise-adding rules (session.config_for_sampler); "" where its options
    switch the noise off (eta or s_noise 0, as ComfyUI's custom sampler
    nodes can set), which makes it deterministic."""
    options = getattr(sampler, "extra_options", None) or {}
    if options.get("eta") == 0 or options.get("s_noise") == 0:
        return ""
    return getattr(getattr(sampler, "sampler_function", None), "__name__", "")


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    transformer_options = original_options.get("transformer_options", {})
    settings: CacheSettings | None = transformer_options.get(SETTINGS_KEY)
    if settings is None or SESSION_KEY in transformer_options:
        return executor(*args, **kwargs)
    refuse_other_cache(transformer_options)
    if not settings.config.skipping_enabled:
        logger.info("RFC: threshold, target_speedup, max_skip or interval is set to never skip; every evaluation is computed")
        return executor(*args, **kwargs)
    # outer_sample(noise, latent_image, sampler, sigmas, ...)
    sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
    sampler = kwargs.get("sampler", args[2] if len(args) > 2 else None)
    sampler_name = sampler_name_of(sampler)
    try:
        session, run_options = _start_session(guider, settings, sigmas, sampler_name)
    except Exception:
        logger.exception("RFC: could not start caching; this run is computed in full")
        return executor(*args, **kwargs)
    guider.model_options = run_options
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        try:
            session.finish()
        except Exception:
            logger.exception("RFC: could not report on this run")


def prepare_sampling_wrapper(executor, model, noise_shape, conds, *args, **kwargs):
    """Before weights load for a run: ComfyUI's estimate of a step's memory,
    which the cache is planned beside (SamplingSession.plan_cache), and on
    the legacy loader the device part of the cache an earlier run of this
    shape had, kept free while weights load."""
    model_options = kwargs.get("model_options", args[0] if args else None) or {}
    session: SamplingSession | None = model_options.get("transformer_options", {}).get(SESSION_KEY)
    if session is None or session.granularity != "blocks":
        return executor(model, noise_shape, conds, *args, **kwargs)
    session.shape_key = tuple(noise_shape)
    session.step_bytes = step_estimate(model, noise_shape, conds)
    with reserved_for_loading(session.settings.device_cache_bytes.get(session.shape_key, 0)):
        return executor(model, noise_shape, conds, *args, **kwargs)


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    model_options = kwargs.get("model_options", args[-1] if args else {})
    transformer_options = model_options.get("transformer_options", {})
    session: SamplingSession | None = transformer_options.get(SESSION_KEY)
    if session is None:
        return executor(*args, **kwargs)
    for key, reason in SAMPLER_STATE_KEYS.items():
        if key in transformer_options:
            session.leave_uncached(reason)
    timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
    if session.conditionings is None:
        # calc_cond_batch(model, conds, x_in, timestep, model_options): one
        # entry per conditioning (cond, uncond), None where it is not run.
        conds = kwargs.get("conds", args[1] if len(args) > 1 else None)
        session.conditionings = sum(1 for cond in conds or () if cond is not None) or None
    guidance_pass = any(key in transformer_options for key in ALTERED_PASS_KEYS)
    return session.evaluate(timestep, lambda: executor(*args, **kwargs), guidance_pass)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    transformer_options = transformer_options if transformer_options is not None else {}
    session: SamplingSession | None = transformer_options.get(SESSION_KEY)

    def compute():
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    # The model this call runs on where it may not be the one the blocks were
    # patched on: under core's MultiGPU node, the device's clone (ComfyUI
    # names the device of each of its worker threads). None in the common
    # case, which also keeps torch.compile's tracer from meeting the model a
    # second time through this variable.
    diffusion_model = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    diffusion_model = getattr(diffusion_model, "_orig_mod", diffusion_model)  # under TorchCompileModel
    if (session.diffusion_model is diffusion_model if session is not None
            else MULTIGPU_THREAD_KEY not in transformer_options):
        diffusion_model = None
    if session is not None and session.caching_off:
        session = None
    token = _ACTIVE_CALL.set(ActiveCall(session, transformer_options, diffusion_model))
    try:
        if session is not None and session.caches_model:
            return session.run_model(compute, x, transformer_options)
        return compute()
    finally:
        _ACTIVE_CALL.reset(token)
