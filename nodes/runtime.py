"""Driving an RFC cache from inside ComfyUI sampling.

Everything reaches ComfyUI through its extension points only:
- an OUTER_SAMPLE wrapper opens a `SamplingSession` for the run and closes
  it in `finally`, so an interrupted run leaves nothing behind;
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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import sys
import threading
import types
from contextvars import ContextVar
from typing import NamedTuple

import torch

from ..rfc_core import CacheConfig, RFCRun
from ..rfc_core.history import flat
from ..rfc_core.run import SHORT_RUN_STEPS, format_bytes
from ..rfc_core.storage import FeatureStorage, should_offload, storage_for
from .adapters import REPLACE, BlockAdapter
from .adapters.base import ALTERED_PASS_KEYS, batch_first, chunk_identity, pack

logger = logging.getLogger("ComfyUI-RFC")

WRAPPER_KEY = "rfc_cache"
SETTINGS_KEY = "rfc_cache_settings"
SESSION_KEY = "rfc_cache_session"
SUMMARY_EVENT = "rfc-cache.summary"
# Set by a sequence-parallel pack in the model's transformer options: a
# function that sums a tensor over the ranks that each hold a slice of the
# tokens (see rfc_core.run.RFCRun, README "Multi-GPU").
RANK_SUM_KEY = "rfc_cache_rank_sum"
MODEL_MODULE = "model"
# Where core's EasyCache and LazyCache nodes keep their state.
EASYCACHE_KEY = "easycache"
# Where Kandinsky 6's in-model MagCache finds its state (ComfyUI after v0.31).
K6_MAGCACHE_KEY = "k6_magcache"
# What core's MultiGPU node sets in the transformer options of each device's
# model call, run in a worker thread of its own.
MULTIGPU_THREAD_KEY = "multigpu_thread_device"
# Samplers that add fresh noise to the latent at every step, by the name of
# their function: the first block's input then moves by that noise, which no
# forecast can know, and RCS's error stays far above a usual threshold.
NOISE_ADDING_SAMPLERS = ("ancestral", "sde", "lcm", "ddpm", "seeds_", "sa_solver", "restart")
# The median forecast error of a run under such samplers was 0.38 to 2.1 on
# both bundled models at 20 to 50 steps (benchmarks.noisy_samplers), so a
# threshold below this predicts nothing there. Such a run longer than a
# short run is cached at NOISE_ADDING_TARGET instead: with euler_ancestral it
# beat sampling with half the steps by 10 to 24 dB, with dpmpp_2m_sde by 1.6
# to 8.3 dB. Not lcm, whose every step denoises fully and noises again: there
# it was within -1.7 to +1.5 dB of half the steps, nothing gained.
NOISE_FLOOR = 0.5
NOISE_ADDING_TARGET = 2.0
NO_TARGET_FOR = ("lcm",)
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


def comfyui_version() -> str:
    """The running ComfyUI's version, for messages about its models."""
    try:
        import comfyui_version as version_module

        return str(version_module.__version__)
    except Exception:
        return "of unknown version"


def adds_noise(sampler_name: str) -> bool:
    return any(part in sampler_name for part in NOISE_ADDING_SAMPLERS)


def config_for_sampler(config: CacheConfig, sampler_name: str, schedule) -> tuple[CacheConfig, str | None]:
    """The settings a run uses with this sampler, and a note when they are
    not the node's: a sampler that adds noise at every step, under a
    threshold that would predict nothing there, runs at NOISE_ADDING_TARGET
    (a short run keeps the threshold: there every step is a large jump; so
    does lcm, see NO_TARGET_FOR)."""
    steps = len(schedule) - 1 if schedule is not None else 0
    if (config.target_speedup or config.scheduler != "rcs" or config.threshold >= NOISE_FLOOR
            or not adds_noise(sampler_name) or sampler_name in NO_TARGET_FOR or steps <= SHORT_RUN_STEPS
            or config.max_skip < 1):
        return config, None
    note = (f"{sampler_name} adds fresh noise to the latent at every step, where threshold {config.threshold:g} "
            f"would predict nothing (below {NOISE_FLOOR:g}), so this run used target_speedup "
            f"{NOISE_ADDING_TARGET:g}; set target_speedup yourself to choose another")
    return dataclasses.replace(config, target_speedup=NOISE_ADDING_TARGET), note


class SamplingSession:
    """One sampling run of one patched model."""

    def __init__(self, settings: CacheSettings, diffusion_model, skip_window, schedule=None, rank_sum=None,
                 sampler_name: str = ""):
        self.settings = settings
        # The sampler's function name (sample_euler_ancestral), for the summary.
        self.sampler_name = sampler_name.removeprefix("sample_")
        self.adapter = settings.adapter
        self.diffusion_model = diffusion_model
        # "blocks" or "model"; a block fault moves the run to "model".
        self.granularity = settings.granularity
        config, self.config_note = config_for_sampler(settings.config, self.sampler_name, schedule)
        self.run = RFCRun(config, settings.first_module, skip_window, schedule,
                          storage_for(config.cache_device, config.cache_dtype), rank_sum)
        # Streams each block actually returned (SD3's last block returns no
        # text stream) or that are empty (LTX-2 without audio); only the
        # others are cached and predicted.
        self.returned_streams: dict = {}
        # Every evaluation from here on is computed: a fault at whole-model
        # granularity, or a sampler that caching would break.
        self.caching_off = False
        # What the summary says about faults.
        self.fault_notes: list[str] = []
        self.warned_non_finite = False
        # Per thread, the block being predicted or computed: a cached block
        # reached again inside it (another node's patch that wraps ours and
        # was chained by us in turn) must only run, not be cached a second
        # time. Per thread because core's MultiGPU node runs each device's
        # chunks in a worker thread of its own, on one session.
        self._thread = threading.local()
        # Guards what those threads share: the decision, counters, faults.
        self.lock = threading.RLock()
        # The MultiGPU clones the run's blocks ran in, by id, for the
        # adapters' end of run.
        self.models_used: dict = {}
        # Blocks another node's forward patch may have taken from us, by
        # module key, until they reach the cache (see _forwards_replaced_later).
        self.unseen_blocks: dict = {}

    @property
    def caches_blocks(self) -> bool:
        """Blocks go through the cache: caching is on and at block granularity."""
        return not self.caching_off and self.granularity == "blocks"

    @property
    def caches_model(self) -> bool:
        return not self.caching_off and self.granularity == "model"

    def evaluate(self, timestep, compute, guidance_pass: bool = False):
        """One model evaluation, however its conditionings are chunked: what
        `compute()` (all of its model calls) returns, computed again in full
        when the predictions in it came out inf or NaN.

        guidance_pass: an extra pass a guidance node runs on the evaluation
        in progress, with the same input and sigma and an altered model (LTX-2's
        STG). It takes that evaluation's decision instead of one of its own,
        so both kinds of pass are predicted at the same evaluations from
        points at the same sigmas (each from its own cache, see
        chunk_identity), and the difference the guidance scales up comes
        from forecasts that err alike."""
        if not (guidance_pass and self.run.current is not None):
            try:
                self.start_evaluation(timestep)
            except Exception:
                self.fail("reading the timestep")
        output = compute()
        if self.prediction_unusable(output):
            output = compute()
        return output

    def start_evaluation(self, timestep) -> None:
        """timestep: the sampler's sigma tensor (read only when needed) or a number."""
        if len(self.run.evaluations) == 1 and self.settings.config.cache_device == "auto" and not self.caching_off:
            self._offload_if_needed()
        self.run.start_evaluation(timestep)

    def _offload_if_needed(self) -> None:
        """cache_device auto, after the first evaluation: the cache holds one
        point per module now and order + 1 once warmed up. If that would
        crowd the device, keep it in system memory from here on."""
        device = self.run.cached_device()
        projected = self.run.cache_bytes() * (self.settings.config.order + 1)
        if device is not None and should_offload(projected, device):
            logger.info("RFC: the cache would take about %s, more than half the free memory of %s; keeping it in "
                        "system memory (cache_device auto)", format_bytes(projected), device)
            self.run.relocate(FeatureStorage("cpu", self.run.storage.dtype))

    def fail(self, where: str) -> None:
        """Caching broke; called from the `except` that caught it. A block
        fault moves the run to whole-model caching, a whole-model fault
        computes everything; the image is never lost. One warning line per
        fault (at most two a run), the traceback at DEBUG."""
        with self.lock:
            self._fail(where, sys.exc_info()[1])

    def _fail(self, where: str, error) -> None:
        if self.caching_off:
            return
        what = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        evaluation = len(self.run.evaluations)
        family, version = self.settings.family, comfyui_version()
        if self.granularity == "blocks":
            self.granularity = "model"
            self.run.rebase(MODEL_MODULE)
            consequence = "caching the whole model call for the rest of this run"
            self.fault_notes.append(f"block caching failed at evaluation {evaluation}, the whole model call was "
                                    f"cached from there")
        else:
            self.caching_off = True
            self.run.switch_off("caching off after a fault")
            consequence = "computing every evaluation in full for the rest of this run"
            self.fault_notes.append(f"caching failed at evaluation {evaluation}, the rest was computed in full")
        logger.warning("RFC: caching failed on %s, ComfyUI %s, while %s (%s); %s. Please report it with the "
                       "traceback that --verbose DEBUG logs.", family, version, where, what, consequence)
        logger.debug("RFC: the fault while %s", where, exc_info=True)

    def leave_uncached(self, reason: str) -> None:
        """Compute every evaluation of this run from now on, and say why once."""
        if self.caching_off:
            return
        logger.info("RFC: %s not cached, because %s; every evaluation is computed", self.settings.family, reason)
        self.caching_off = True
        self.run.switch_off("not cached")
        self.fault_notes.append(f"not cached: {reason}")

    def prediction_unusable(self, output) -> bool:
        """After an evaluation: whether its output, built from predictions,
        has inf or NaN in it (fp16 extrapolation can overflow, a cached
        feature can hold a NaN the model once made). Then the evaluation is
        counted as computed, every cached module holding such values is
        dropped, and True tells the caller to compute it again in full: a
        prediction never costs the image. One host sync per predicted
        evaluation, none per block and none on computed evaluations."""
        if not self.run.predicting or self.caching_off:
            return False
        try:
            leaves = tensor_leaves(output)
            if bool(torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all()):
                return False
            dropped = self.run.drop_non_finite()
        except Exception:
            self.fail("checking the predicted output")
            self.run.recompute_current("computed again after a fault")
            return True
        self.run.recompute_current("computed again: the prediction had inf or NaN")
        if not self.warned_non_finite:
            logger.warning("RFC: the predicted output at sigma %.4g has inf or NaN values; that evaluation is "
                           "computed again in full, and %d cached module(s) holding such values were dropped "
                           "(said once per run)", self.run.current.sigma, dropped)
        self.warned_non_finite = True
        return True

    def run_block(self, kind: str, index: int, args: dict, compute, transformer_options: dict) -> dict:
        """Predict or compute one block. `compute(args)` runs the real block and
        returns what the block's caller reads back; the result has the same form."""
        if getattr(self._thread, "running_module", None) is not None:
            return compute(args)
        self._thread.running_module = (kind, index)
        if self.unseen_blocks:
            self.unseen_blocks.pop((kind, index), None)
        try:
            return self._run_block(kind, index, args, compute, transformer_options)
        finally:
            self._thread.running_module = None

    def model_in_use(self):
        """The diffusion model the block in progress runs in: under core's
        MultiGPU node a device's clone, whose blocks (and weights on that
        device) the module input must be read from."""
        diffusion_model = active_diffusion_model()
        if diffusion_model is None:
            return self.diffusion_model
        if id(diffusion_model) not in self.models_used:
            with self.lock:
                self.models_used[id(diffusion_model)] = diffusion_model
        return diffusion_model

    def _units(self, kind: str, index: int, names) -> list[tuple]:
        """The cached modules of one block: (module key, its stream names)."""
        if self.adapter.group(kind).separate_streams:
            return [((kind, index, name), (name,)) for name in names]
        return [((kind, index), tuple(names))]

    def _module_inputs(self, kind: str, index: int, args: dict, units) -> dict:
        group = self.adapter.group(kind)
        module_inputs = {}
        diffusion_model = None
        for unit_key, names in units:
            if not self.run.needs_module_input(unit_key):
                continue
            diffusion_model = diffusion_model or self.model_in_use()
            build = (self.adapter.module_input if unit_key == self.run.first_module
                     else self.adapter.sampled_module_input)
            if group.separate_streams:
                value = build(diffusion_model, kind, index, args, stream=names[0])
            else:
                value = build(diffusion_model, kind, index, args)
            # Estimators take per-sample norms over everything but dim 0.
            module_inputs[unit_key] = value.movedim(group.batch_dim, 0)
        return module_inputs

    def _run_block(self, kind: str, index: int, args: dict, compute, transformer_options: dict) -> dict:
        adapter = self.adapter
        run = self.run
        group = adapter.group(kind)
        batch_dim = group.batch_dim
        block_key = (kind, index)
        module = f"{kind} {index}"
        try:
            inputs = adapter.read_streams(kind, args)
            names = self.returned_streams.get(block_key)
            # Until a block has run once it is not known which streams it
            # returns (SD3's last block drops its text stream).
            returns_known = names is not None
            if not returns_known:
                names = tuple(name for name in group.streams if _non_empty(inputs[name]))
            dropped_tokens = adapter.dropped_tail_tokens(kind, args)
            chunk_key = chunk_identity(transformer_options, inputs[group.streams[0]], dropped_tokens)
            units = self._units(kind, index, names)
            if dropped_tokens:
                for unit_key, unit_names in units:
                    run.keep_leading(chunk_key, unit_key, [inputs[name].numel() // inputs[name].shape[batch_dim]
                                                           for name in unit_names])
            module_inputs = self._module_inputs(kind, index, args, units)
            if all(run.predicts(chunk_key, unit_key, module_inputs.get(unit_key)) for unit_key, _ in units):
                predicted = dict(inputs)  # streams that are not cached pass through
                for unit_key, unit_names in units:
                    bases = [batch_first(inputs[name], batch_dim) for name in unit_names]
                    outputs = run.predict_onto(chunk_key, unit_key, module_inputs.get(unit_key), bases)
                    for name, base, value in zip(unit_names, bases, outputs):
                        predicted[name] = value.view(base.shape).movedim(0, batch_dim)
                run.count_module(predicted=True)
                return adapter.write_streams(kind, predicted)
            in_slots = returns_known and run.storage.device is None and run.records()
            kept = self._keep_inputs(chunk_key, units, inputs, batch_dim, in_slots)
        except Exception:
            self.fail(f"predicting {module}")
            return compute(args)
        try:
            output = compute(args)
        except BaseException:
            # A traceback the caller keeps (an interrupted run) must not keep
            # the cache's slots alive through this frame.
            kept = None
            raise
        run.count_module(predicted=False)
        if not self.caches_blocks:  # another thread's fault moved the run on meanwhile
            return output
        try:
            returned_streams = adapter.read_streams(kind, output)
            if in_slots:
                with torch.no_grad():  # the cache is never differentiated through
                    for (unit_key, unit_names), targets in zip(units, kept):
                        for name, target in zip(unit_names, targets):
                            torch.sub(_rows(returned_streams[name], batch_dim), target, out=target)
                        run.commit(chunk_key, unit_key, module_inputs.get(unit_key))
                return output
            returned = tuple(name for name in names if returned_streams.get(name) is not None)
            self.returned_streams[block_key] = returned
            kept_by_name = {name: target for (_, unit_names), targets in zip(units, kept)
                            for name, target in zip(unit_names, targets)}
            for unit_key, unit_names in self._units(kind, index, returned):
                residuals = [_rows(returned_streams[name], batch_dim).detach() - kept_by_name[name]
                             for name in unit_names]
                run.store(chunk_key, unit_key, module_inputs.get(unit_key), residuals)
        except Exception:
            self.fail(f"recording {module}")
        return output

    @torch.no_grad()
    def _keep_inputs(self, chunk_key, units, inputs: dict, batch_dim: int, in_slots: bool) -> list:
        """The block's inputs, kept before it runs: blocks may update them in
        place (Flux's do). Straight into the cache's slots where it can,
        where the residual is then formed in place; per unit, one
        (batch, features) tensor per stream."""
        kept = []
        for unit_key, unit_names in units:
            streams = [_rows(inputs[name], batch_dim) for name in unit_names]
            targets = (self.run.reserve(chunk_key, unit_key, streams) if in_slots
                       else [torch.empty_like(stream) for stream in streams])
            for target, stream in zip(targets, streams):
                target.copy_(stream)
            kept.append(targets)
        return kept

    def run_model(self, compute, x, transformer_options: dict):
        """Whole-model granularity: the model call is the one cached module,
        the noisy latent its input, the denoised latent minus it the residual.
        A latent of several tensors (ComfyUI's NestedTensor of video and
        audio, or a list) is cached as all of them together, one stream each."""
        run = self.run
        try:
            leaves = tensor_leaves(x)
            chunk_key = chunk_identity(transformer_options, leaves[0])
            module_input = pack(leaves) if run.needs_module_input(MODEL_MODULE) else None
            if run.predicts(chunk_key, MODEL_MODULE, module_input):
                outputs = run.predict_onto(chunk_key, MODEL_MODULE, module_input, leaves)
                run.count_module(predicted=True)
                return rebuild_leaves(x, [value.view(leaf.shape) for value, leaf in zip(outputs, leaves)])
            kept = [leaf.detach().clone() for leaf in leaves]
        except Exception:
            self.fail("predicting the model output")
            return compute()
        try:
            output = compute()
        except BaseException:
            kept = None
            raise
        run.count_module(predicted=False)
        try:
            output_leaves = tensor_leaves(output)
            if [t.shape for t in output_leaves] != [t.shape for t in leaves]:
                raise TypeError("the model output is not shaped like its input")
            residuals = [flat(value).detach() - flat(leaf).to(value.dtype) for value, leaf in zip(output_leaves, kept)]
            run.store(chunk_key, MODEL_MODULE, module_input, residuals)
        except Exception:
            self.fail("recording the model output")
        return output

    def finish(self) -> str:
        self.run.finish()
        if self.adapter is not None:
            for diffusion_model in (self.diffusion_model, *self.models_used.values()):
                self.adapter.end_run(diffusion_model)
            self.models_used.clear()
        self.returned_streams.clear()
        summary = f"RFC on {self.settings.family} ({self.settings.granularity}): {self.run.summary()}"
        if self.fault_notes:
            summary += f" ({'; '.join(self.fault_notes)})"
        advice = self.advice()
        if advice:
            summary += f". {advice}"
        logger.info("%s", summary)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("RFC: each model evaluation of this run:\n%s", self.run.step_table())
        if self.unseen_blocks and self.run.evaluations and self.caches_blocks:
            # Module keys start with the block's (kind, index); a stream's adds its name.
            first_block = self.settings.first_module[:2]
            nothing_skipped = ("; nothing could be skipped, the first block is among them"
                               if first_block in self.unseen_blocks else "")
            logger.warning("RFC: a node applied after RFC Cache replaced the forward of %d block(s) without "
                           "calling RFC's (%s): they were computed every time%s. Apply that node before RFC Cache.",
                           len(self.unseen_blocks), ", ".join(self.unseen_blocks.values()), nothing_skipped)
        _send_summary(self.settings.node_id, summary, self.run, advice)
        return summary

    def advice(self) -> str | None:
        """What to do when the threshold let nothing be predicted, or why
        the run did not use it."""
        reason = self.run.why_nothing_was_predicted()
        if reason is None:
            return self.config_note
        cause = (f"; {self.sampler_name} adds fresh noise to the latent at every step, which no forecast of the "
                 f"first block's input can know" if adds_noise(self.sampler_name) else "")
        return (f"{reason[0].upper()}{reason[1:]}{cause}. Set target_speedup (2 computes half of the steps) to "
                f"cache on a fixed budget, or raise the threshold")


def _rows(stream: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """A block stream as the cache keeps it: (batch, features)."""
    return flat(batch_first(stream, batch_dim))


def _non_empty(stream) -> bool:
    return stream is not None and stream.numel() > 0


def tensor_leaves(value) -> list[torch.Tensor]:
    """The tensors of a model input or output: a tensor, a list or tuple of
    them, or ComfyUI's NestedTensor (which keeps them in `.tensors`)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in tensor_leaves(item)]
    if getattr(value, "is_nested", False) and isinstance(getattr(value, "tensors", None), list):
        return [leaf for item in value.tensors for leaf in tensor_leaves(item)]
    raise TypeError(f"cannot cache a model value of type {type(value).__name__}")


def rebuild_leaves(like, leaves: list[torch.Tensor]):
    """`like`'s structure with `leaves` in place of its tensors."""
    remaining = iter(leaves)

    def build(item):
        if isinstance(item, torch.Tensor):
            return next(remaining)
        if isinstance(item, (list, tuple)):
            return type(item)(build(part) for part in item)
        rebuilt = copy.copy(item)  # a NestedTensor: same class, new tensor list
        rebuilt.tensors = [build(part) for part in item.tensors]
        return rebuilt

    return build(like)


def summary_message(node_id: str, summary: str, run: RFCRun, advice: str | None = None) -> dict:
    """What the front-end draws: one entry per model evaluation."""
    return {
        "node": node_id,
        "summary": summary,
        "advice": advice,
        "computed": run.computed_evaluations,
        "total": len(run.evaluations),
        "target_speedup": run.config.target_speedup,
        "peak_bytes": run.peak_bytes,
        "evaluations": [{"sigma": e.sigma, "computed": e.counts_as_computed, "accumulated": e.accumulated,
                         "threshold": e.threshold, "reason": e.reason} for e in run.evaluations],
    }


def _send_summary(node_id: str | None, summary: str, run: RFCRun, advice: str | None = None) -> None:
    """Show the run on the node when a browser is listening; without a
    server (headless use, tests) there is nobody to tell."""
    server_module = sys.modules.get("server")
    prompt_server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if node_id is None or prompt_server is None:
        return
    try:
        prompt_server.send_sync(SUMMARY_EVENT, summary_message(node_id, summary, run, advice))
    except Exception:
        logger.debug("RFC: could not send the summary to the front-end", exc_info=True)


class ActiveCall(NamedTuple):
    """The model call in progress on this thread: its session (None when the
    run is not cached), its transformer options, and the diffusion model
    running it, which under core's MultiGPU node is the device's own clone."""

    session: SamplingSession | None
    transformer_options: dict
    diffusion_model: torch.nn.Module | None


# Set by the APPLY_MODEL wrapper, so blocks of families whose block arguments
# carry no transformer options (HunyuanDiT, Wan S2V, PixArt, object-patched
# blocks) still find their session, and every block finds the model it runs
# in. A context variable: each of MultiGPU's worker threads has its own.
_ACTIVE_CALL: ContextVar[ActiveCall | None] = ContextVar("rfc_active_call", default=None)


def active_diffusion_model():
    active = _ACTIVE_CALL.get()
    return None if active is None else active.diffusion_model


def _session_for(args: dict) -> tuple[SamplingSession | None, dict]:
    transformer_options = args.get("transformer_options")
    if isinstance(transformer_options, dict) and SESSION_KEY in transformer_options:
        return transformer_options[SESSION_KEY], transformer_options
    active = _ACTIVE_CALL.get()
    if active is None or active.session is None:
        return None, {}
    return active.session, active.transformer_options


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
        # Where the block is under the diffusion model: a MultiGPU clone gets
        # this same object patch, and must run its own block, not ours.
        self.block_path = block_path

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
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()

        def compute(_):
            returned = forward(*bound.args, **bound.kwargs)
            if len(self.outputs) == 1:
                return {self.outputs[0]: returned}
            return dict(zip(self.outputs, returned))

        streams = session.run_block(self.kind, self.index, bound.arguments, compute, active.transformer_options)
        if len(self.outputs) == 1:
            return streams[self.outputs[0]]
        return tuple(streams[name] for name in self.outputs)


def forward_patch_key(adapter: BlockAdapter, diffusion_model, kind: str, index: int) -> str:
    """The ModelPatcher object-patch key of a block's forward."""
    return f"diffusion_model.{adapter.block_path(diffusion_model, kind, index)}.forward"


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


def _chain_patches_added_later(run_options: dict, settings: CacheSettings, diffusion_model) -> None:
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


def _forwards_replaced_later(model_patcher, settings: CacheSettings, diffusion_model) -> dict:
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
        _chain_patches_added_later(run_options, settings, diffusion_model)
        session.unseen_blocks = _forwards_replaced_later(model_patcher, settings, diffusion_model)
    return session, run_options


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
    sampler_name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
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
