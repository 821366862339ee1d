"""One sampling run of one patched model (SamplingSession): the decision,
every cached block or model call, faults, and the summary at the end."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import threading
from typing import NamedTuple

import torch

from ...rfc_core import CacheConfig, RFCRun
from ...rfc_core.history import flat
from ...rfc_core.memory import Footprint, Layout, choose_layout
from ...rfc_core.run import SHORT_RUN_STEPS, format_bytes
from ...rfc_core.storage import DTYPES, FeatureStorage, storage_for
from ..adapters.base import MODULE_INPUT_CHANNELS, MODULE_INPUT_TOKENS, batch_first, chunk_identity, pack
from .active_call import active_diffusion_model
from .memory import budget_for
from .settings import MODEL_MODULE, CacheSettings
from .summary import send_summary

logger = logging.getLogger("ComfyUI-RFC")

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


# Few-step runs (benchmarks.few_steps, the bundled distilled Flux, 16
# samples, cfg 1, against the plain run at that step count):
# - at 4 steps every cache lost to plain sampling with 3 steps at the same
#   compute with euler (whole evaluations 30.33 dB, computed head 24.08,
#   plain 33.24) and won by 0.5 dB at most with res_multistep, so a run of
#   fewer than FEWEST_STEPS_CACHED steps is left uncached;
# - at 8 steps the first third of the blocks computed in every evaluation,
#   at most one evaluation in a row predicted, beat plain sampling with 6
#   steps at 0.75 of its compute (38.61 against 38.09 dB with euler, 36.09
#   against 35.67 with res_multistep) and with 7 at 0.83 (40.58 dB).
FEWEST_STEPS_CACHED = 6
FEW_STEP_HEAD = 1 / 3
FEW_STEP_MAX_SKIP = 1


def config_for_short_run(config: CacheConfig, schedule, granularity: str) -> tuple[CacheConfig, str | None]:
    """The settings a short run uses (at most SHORT_RUN_STEPS steps, ending
    the image: turbo and lightning models), and a note saying so: left
    uncached below FEWEST_STEPS_CACHED steps, else the few-step mode. A
    speedup target or a computed head the user set is kept as set."""
    steps = len(schedule) - 1 if schedule is not None else 0
    if (not 0 < steps <= SHORT_RUN_STEPS or float(schedule[-1]) != 0.0 or config.target_speedup
            or config.computed_head or config.scheduler != "rcs" or not config.skipping_enabled):
        return config, None
    if steps < FEWEST_STEPS_CACHED:
        return dataclasses.replace(config, max_skip=0), (
            f"a {steps}-step run is left uncached: below {FEWEST_STEPS_CACHED} steps every cache measured lost to "
            f"sampling with fewer steps at the same compute; set target_speedup to cache it anyway")
    if granularity != "blocks":
        return dataclasses.replace(config, max_skip=FEW_STEP_MAX_SKIP), (
            f"a {steps}-step run predicts at most one evaluation in a row")
    config = dataclasses.replace(config, computed_head=FEW_STEP_HEAD, max_skip=FEW_STEP_MAX_SKIP)
    return config, (f"a {steps}-step run uses the few-step mode: the first third of the blocks is computed in every "
                    f"evaluation, at most one evaluation in a row predicted")


class Span(NamedTuple):
    """Consecutive blocks of one group cached as one unit (rfc_core.memory):
    the leader's key is the unit's, and the last block's index closes it."""
    leader: tuple
    last: int


class OpenSpan(NamedTuple):
    """A span being computed: its summed residual so far, per stream."""
    leader: tuple
    chunk_key: object
    module_input: torch.Tensor | None
    names: tuple
    residuals: list


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
        if settings.adapts_short_runs and self.config_note is None:
            config, self.config_note = config_for_short_run(config, schedule, self.granularity)
        self.run = RFCRun(config, settings.first_module, skip_window, schedule,
                          storage_for(config.cache_device, config.cache_dtype), rank_sum,
                          self._head_blocks(config, settings.adapter, diffusion_model))
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
        # module key, until they reach the cache (see forwards_replaced_later).
        self.unseen_blocks: dict = {}
        # The cache's layout, chosen at the first block before anything is
        # allocated (plan_cache); None until then.
        self.layout: Layout | None = None
        self.footprint: Footprint | None = None
        # Block key -> its Span, for blocks cached in spans of more than one.
        self.spans: dict = {}
        # (kind, index, stream names) -> the block's units (_units), made
        # once per run instead of on every block call.
        self._unit_lists: dict = {}
        # Set by the wrappers: how many conditionings an evaluation runs
        # (cond and uncond: 2), and ComfyUI's estimate of a step's memory.
        self.conditionings: int | None = None
        self.step_bytes = 0
        # The noise shape this run was prepared for, which the settings
        # remember the device part of the cache by (wrappers.prepare_sampling_wrapper).
        self.shape_key = None

    def _head_blocks(self, config, adapter, diffusion_model) -> frozenset:
        """The first blocks, in the order the model runs them, that
        config.computed_head has every evaluation compute: at least one
        where it is above 0."""
        if not config.computed_head or self.granularity != "blocks" or adapter is None:
            return frozenset()
        keys = adapter.block_keys(diffusion_model)
        return frozenset(keys[:max(1, round(config.computed_head * len(keys)))])

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
        self.run.start_evaluation(timestep)

    def _group_blocks(self) -> tuple[list[list[tuple]], list[tuple]]:
        """The blocks that may be cached in spans, as runs of consecutive
        blocks of one group, and those cached one by one (the computed head,
        groups whose streams are cached apart)."""
        runs, singles = [], []
        for key in self.adapter.block_keys(self.diffusion_model):
            if self.run.in_head(key) or self.adapter.group(key[0]).separate_streams:
                singles.append(key)
            elif runs and runs[-1][-1][0] == key[0] and runs[-1][-1][1] + 1 == key[1]:
                runs[-1].append(key)
            else:
                runs.append([key])
        return runs, singles

    # Once per run, and host work only (memory queries, logging): not traced
    # under core's TorchCompileModel, whose tracer fails on its formatting.
    @torch.compiler.disable
    def plan_cache(self, first_rows: list[torch.Tensor], module_input, transformer_options: dict) -> None:
        """Project the whole run's cache at the first block, before any of it
        exists, and choose the finest layout the memory admits
        (rfc_core.memory); where none does, cache the whole model call."""
        config = self.run.config
        batch = first_rows[0].shape[0]
        in_chunk = len(transformer_options.get("cond_or_uncond") or [0]) or 1
        samples = max(1, batch // in_chunk) * (self.conditionings or in_chunk)
        first_input = module_input.numel() // batch if module_input is not None else 0
        sampled = (min(first_input, MODULE_INPUT_TOKENS * MODULE_INPUT_CHANNELS)
                   if config.estimator == "rfe" else 0)
        fixed_dtype = DTYPES.get(config.cache_dtype)
        element = (first_rows[0].element_size() if fixed_dtype in (None, torch.int8)
                   else torch.empty((), dtype=fixed_dtype).element_size())
        runs, singles = self._group_blocks()
        self.footprint = Footprint(tuple(len(r) for r in runs) + (1,) * len(singles),
                                   sum(r.shape[1] for r in first_rows), first_input, sampled, element, samples,
                                   config.order + 1, batch)
        budget, separate_system = budget_for(first_rows[0].device, self.step_bytes, config.memory_budget)
        system = {"model": False, "cpu": True}.get(config.cache_device)
        if not separate_system:
            system = False
        int8 = None if config.cache_dtype == "auto" else config.cache_dtype == "int8"
        layout = choose_layout(self.footprint, budget, config.cache_span or None, int8, system)
        limits = ", ".join(f"{name} {format_bytes(value)}" for name, value in
                           (("device", budget.device), ("system", budget.system), ("memory_budget", budget.cap))
                           if value is not None and (name != "system" or separate_system))
        if layout is None:
            smallest = min(self.footprint.total(c) for c in
                           (Layout(max(self.footprint.group_blocks), True, False),
                            Layout(max(self.footprint.group_blocks), True, True)))
            logger.warning("RFC: a block-level cache of this run needs at least %s with these widgets, more than "
                           "the memory there is (%s); caching the whole model call instead", format_bytes(smallest),
                           limits or "no limit read")
            self.fault_notes.append(f"block-level cache did not fit ({limits}): the whole model call was cached")
            self.granularity = "model"
            self.run.rebase(MODEL_MODULE)
            return
        self.layout = layout
        self.run.storage = FeatureStorage("cpu" if layout.system else None,
                                          torch.int8 if layout.int8 else (fixed_dtype or None))
        for run in runs:
            for start in range(0, len(run), layout.span):
                members = run[start:start + layout.span]
                if len(members) > 1:
                    for key in members:
                        self.spans[key] = Span(members[0], members[-1][1])
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.footprint.parts(layout).items())
        logger.info("RFC: the cache will take %s (%s), %s; budget: %s", format_bytes(self.footprint.total(layout)),
                    parts, layout.describe(), limits or "none read")
        self.settings.device_cache_bytes[self.shape_key] = self.footprint.on_device(layout)

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
        if getattr(self._thread, "running_module", None) is not None or self.adapter.uncached_call(kind, args):
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

    def _units(self, kind: str, index: int, names) -> tuple:
        """The cached modules of one block: (module key, its stream names)."""
        key = (kind, index, tuple(names))
        units = self._unit_lists.get(key)
        if units is None:
            if self.adapter.group(kind).separate_streams:
                units = tuple(((kind, index, name), (name,)) for name in names)
            else:
                units = (((kind, index), tuple(names)),)
            self._unit_lists[key] = units
        return units

    def _module_inputs(self, kind: str, index: int, args: dict, units, group) -> dict:
        run = self.run
        module_inputs = {}
        diffusion_model = None
        for unit_key, names in units:
            if not run.needs_module_input(unit_key):
                continue
            diffusion_model = diffusion_model or self.model_in_use()
            build = (self.adapter.module_input if unit_key == run.first_module
                     else self.adapter.sampled_module_input)
            if group.separate_streams:
                value = build(diffusion_model, kind, index, args, stream=names[0])
            else:
                value = build(diffusion_model, kind, index, args)
            # Estimators take per-sample norms over everything but dim 0.
            module_inputs[unit_key] = value if group.batch_dim == 0 else value.movedim(group.batch_dim, 0)
        return module_inputs

    def _run_block(self, kind: str, index: int, args: dict, compute, transformer_options: dict) -> dict:
        adapter = self.adapter
        run = self.run
        group = adapter.group(kind)
        batch_dim = group.batch_dim
        block_key = (kind, index)
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
            span = self.spans.get(block_key)
            if span is not None and span.leader != block_key:
                return self._run_span_member(kind, index, span, args, compute, inputs, chunk_key, batch_dim)
            module_inputs = self._module_inputs(kind, index, args, units, group)
            if self.layout is None:
                with self.lock:  # chunks in threads of their own (MultiGPU) plan once
                    if self.layout is None and self.caches_blocks:
                        self.plan_cache([_rows(inputs[name], batch_dim) for name in names],
                                        module_inputs.get(self.settings.first_module), transformer_options)
                if not self.caches_blocks:
                    return compute(args)
                span = self.spans.get(block_key)
            if (run.predicts(chunk_key, units[0][0], module_inputs.get(units[0][0])) if len(units) == 1 else
                    all(run.predicts(chunk_key, unit_key, module_inputs.get(unit_key)) for unit_key, _ in units)):
                predicted = dict(inputs)  # streams that are not cached pass through
                for unit_key, unit_names in units:
                    bases = [inputs[name] if batch_dim == 0 else inputs[name].movedim(batch_dim, 0)
                             for name in unit_names]
                    outputs = run.predict_onto(chunk_key, unit_key, module_inputs.get(unit_key), bases)
                    for name, base, value in zip(unit_names, bases, outputs):
                        value = value.view(base.shape)
                        predicted[name] = value if batch_dim == 0 else value.movedim(0, batch_dim)
                run.count_module(predicted=True)
                return adapter.write_streams(kind, predicted)
            in_slots = (returns_known and run.storage.device is None and not run.storage.quantized and span is None
                        and run.records())
            kept = self._keep_inputs(chunk_key, units, inputs, batch_dim, in_slots)
        except Exception:
            self.fail(f"predicting {kind} {index}")
            return compute(args)
        if span is not None:
            return self._compute_span_leader(block_key, args, compute, units, kept, module_inputs, chunk_key,
                                             batch_dim)
        try:
            output = compute(args)
        except BaseException:
            # A traceback the caller keeps (an interrupted run) must not keep
            # the cache's slots alive through this frame.
            kept = None
            raise
        run.count_module(predicted=False, head=run.in_head(block_key))
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
                # In place: the kept inputs are this call's own copies.
                residuals = [torch.sub(_rows(returned_streams[name], batch_dim).detach(), kept_by_name[name],
                                       out=kept_by_name[name]) for name in unit_names]
                run.store(chunk_key, unit_key, module_inputs.get(unit_key), residuals)
        except Exception:
            self.fail(f"recording {kind} {index}")
        return output

    def _compute_span_leader(self, block_key, args, compute, units, kept, module_inputs, chunk_key, batch_dim):
        """Compute a span's first block and start adding up the span's
        residual (Span); it is stored when the span's last block is done."""
        try:
            output = compute(args)
        except BaseException:
            kept = None
            raise
        self.run.count_module(predicted=False, head=self.run.in_head(block_key))
        if not self.caches_blocks:
            return output
        try:
            (unit_key, names), = units
            returned = self.adapter.read_streams(block_key[0], output)
            residuals = []
            with torch.no_grad():
                for number, (name, before) in enumerate(zip(names, kept[0])):
                    after = _rows(returned[name], batch_dim)
                    total = self.run.bank.scratch.get(("span", number), after.shape, after.dtype, after.device)
                    residuals.append(torch.sub(after, before, out=total))
            self._thread.open_span = OpenSpan(unit_key, chunk_key, module_inputs.get(unit_key), names, residuals)
        except Exception:
            self.fail(f"recording {block_key[0]} {block_key[1]}")
        return output

    def _run_span_member(self, kind: str, index: int, span: Span, args: dict, compute, inputs: dict, chunk_key,
                         batch_dim: int) -> dict:
        """A block of a span after its first: passed through where the span
        was predicted (the leader returned the whole span's forecast), else
        computed with its residual added to the span's; the span's last
        block stores the sum under the leader's key. What the model does
        between the blocks stays outside the sum, as it does per block."""
        run = self.run
        if run.predicts(chunk_key, span.leader, None):
            run.count_module(predicted=True)
            return self.adapter.write_streams(kind, dict(inputs))
        open_span = getattr(self._thread, "open_span", None)
        if open_span is None or open_span.leader != span.leader or open_span.chunk_key != chunk_key:
            open_span = None  # its leader was not recorded (planned mid-evaluation, a fault)
        with torch.no_grad():
            kept = ([_rows(inputs[name], batch_dim).clone() for name in open_span.names]
                    if open_span is not None else None)
        output = compute(args)
        run.count_module(predicted=False)
        if open_span is None or not self.caches_blocks:
            return output
        try:
            returned = self.adapter.read_streams(kind, output)
            with torch.no_grad():
                for total, name, before in zip(open_span.residuals, open_span.names, kept):
                    if returned.get(name) is None:
                        raise ValueError(f"{kind} {index} returned no {name} stream inside a span")
                    total.add_(_rows(returned[name], batch_dim)).sub_(before)
            if index == span.last:
                self._thread.open_span = None
                run.store(chunk_key, span.leader, open_span.module_input, open_span.residuals)
        except Exception:
            self.fail(f"recording {kind} {index}")
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
            # Kept for the whole run beside the cache: part of its peak.
            self.run.peak_bytes += sum(self.adapter.kept_bytes(model)
                                       for model in (self.diffusion_model, *self.models_used.values()))
            for diffusion_model in (self.diffusion_model, *self.models_used.values()):
                self.adapter.end_run(diffusion_model)
            self.models_used.clear()
        self.returned_streams.clear()
        layout = f", {self.layout.describe()}" if self.layout is not None else ""
        summary = f"RFC on {self.settings.family} ({self.settings.granularity}{layout}): {self.run.summary()}"
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
        send_summary(self.settings.node_id, summary, self.run, advice)
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
