"""Samplers, schedulers and hand-made sigma lists against RFC, on Flux, Wan and
Lumina 2 (an object-patched family).

Every case samples through ComfyUI's own KSampler (`comfy.sample.sample`,
with `sigmas=` for a custom list) and is checked three ways: the unpatched
run, threshold 0 (must be bit-identical to it) and forced caching (finite,
shaped like it, and computing exactly the evaluations the pack's rules
allow). Which evaluations ran which blocks is watched from outside the pack:
ComfyUI's `sampler_calc_cond_batch_function` option marks each model
evaluation and torch hooks count real block executions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from family_harness import FORCED, NEVER_SKIPS, FamilySpec, pack_module, rfc
from rfc_core.run import SHORT_RUN_STEPS
from shared_specs import FLUX_SPEC, SPECS
from tiny_models import build

THRESHOLD_ZERO = {**FORCED, "threshold": 0.0}


@dataclass
class ModelCall:
    """One forward of the diffusion model: one chunk of an evaluation."""

    uuids: tuple
    shape: tuple
    blocks: int = 0


@dataclass
class Evaluation:
    sigma: float
    calls: list

    @property
    def blocks(self) -> int:
        return sum(call.blocks for call in self.calls)


class ExecutionLog:
    """What a sampling run really executed, evaluation by evaluation."""

    def __init__(self, diffusion_model, counted_modules):
        self.diffusion_model = diffusion_model
        self.counted_modules = counted_modules
        self.evaluations: list[Evaluation] = []
        self.handles = []

    def watch(self, model_patcher):
        """Make `model_patcher` report the start of each evaluation here."""
        import comfy.samplers

        def calc_cond_batch(args):
            self.evaluations.append(Evaluation(float(args["sigma"].flatten()[0]), []))
            return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                  args["model_options"])

        model_patcher.model_options["sampler_calc_cond_batch_function"] = calc_cond_batch
        return model_patcher

    def __enter__(self):
        def model_call(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            options = kwargs.get("transformer_options") or {}
            self.evaluations[-1].calls.append(ModelCall(tuple(options.get("uuids") or ()), tuple(x.shape)))

        def block_executed(module, inputs, output):
            self.evaluations[-1].calls[-1].blocks += 1

        self.handles = [self.diffusion_model.register_forward_pre_hook(model_call, with_kwargs=True)]
        self.handles += [module.register_forward_hook(block_executed) for module in self.counted_modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @property
    def sigmas(self) -> list[float]:
        return [evaluation.sigma for evaluation in self.evaluations]

    @property
    def blocks(self) -> int:
        return sum(evaluation.blocks for evaluation in self.evaluations)

    def computed(self, reference: "ExecutionLog") -> list[bool]:
        """Per evaluation: whether it executed every block the unpatched run
        did. Anything between all and none is a failure in itself."""
        assert len(self.evaluations) == len(reference.evaluations)
        flags = []
        for mine, theirs in zip(self.evaluations, reference.evaluations):
            assert mine.blocks in (0, theirs.blocks), (mine, theirs)
            flags.append(mine.blocks == theirs.blocks)
        return flags


def counted_modules(spec: FamilySpec, model, nodes) -> list:
    diffusion_model = model.model.diffusion_model
    if spec.counted_modules is not None:
        return list(spec.counted_modules(diffusion_model))
    adapter = pack_module(nodes, "nodes.adapters").detect_adapter(diffusion_model)
    return [adapter.block(diffusion_model, *key) for key in adapter.block_keys(diffusion_model)]


def run_logged(spec: FamilySpec, model, patcher, nodes, *, sampler="euler", scheduler="simple", steps=6, sigmas=None,
               cfg=3.0, batch=1, positive=None, negative=None, seed=0):
    """Sample `patcher` (the plain `model` or an RFC clone of it) and log it."""
    import comfy.sample

    if patcher is model:
        patcher = model.clone()
    log = ExecutionLog(model.model.diffusion_model, counted_modules(spec, model, nodes))
    log.watch(patcher)
    shape = (batch, *spec.latent_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    positive = positive if positive is not None else spec.conditioning(batch, 1)
    negative = negative if negative is not None else spec.conditioning(batch, 2)
    custom = None if sigmas is None else torch.tensor(sigmas, dtype=torch.float32)
    with log:
        latent = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative,
                                     torch.zeros(shape), sigmas=custom, seed=seed, disable_pbar=True)
    return latent, log


def forced_plan(sigmas: list[float], schedule: list[float], order: int = FORCED["order"],
                max_skip: int = FORCED["max_skip"]) -> list[bool]:
    """Which evaluations forced caching computes on a schedule whose sigmas
    never rise, by the pack's rules: the warm-up lasts until order + 1
    evaluations at different sigmas are computed (a repeated sigma adds no
    point to a forecast), at most `max_skip` evaluations in a row are
    predicted, sigma 0 lies outside the skip window (0, 1] of these flow
    models, and a schedule of at most SHORT_RUN_STEPS steps to sigma 0
    computes its last step (every evaluation at its sigma or below).
    Threshold 10 is never reached on these tiny models."""
    assert all(later <= earlier for earlier, later in zip(sigmas, sigmas[1:])), sigmas
    short = len(schedule) - 1 <= SHORT_RUN_STEPS and schedule[-1] == 0.0
    last_step = schedule[-2] if short else -1.0
    plan, points, in_row = [], set(), 0
    for sigma in sigmas:
        skip = len(points) > 0 and in_row < max_skip and 0.0 < sigma <= 1.0 and sigma > last_step * (1 + 1e-4)
        plan.append(not skip)
        if skip:
            in_row += 1
        else:
            in_row = 0
            points.add(sigma)
    return plan


@dataclass(frozen=True)
class Case:
    sampler: str = "euler"
    scheduler: str = "simple"
    steps: int = 6
    sigmas: tuple[float, ...] | None = None
    widgets: tuple = ()
    # Computed evaluations under `widgets`, where forced_plan does not apply.
    plan: tuple[bool, ...] | None = None

    @property
    def id(self) -> str:
        if self.sigmas is not None:
            return f"{self.sampler}-sigmas[{','.join(f'{s:g}' for s in self.sigmas)}]"
        return f"{self.sampler}-{self.scheduler}-{self.steps}"

    def schedule(self, model) -> list[float]:
        if self.sigmas is not None:
            return list(self.sigmas)
        return comfy_schedule(model, self.sampler, self.steps, self.scheduler)

    def run(self, spec, model, patcher, nodes):
        return run_logged(spec, model, patcher, nodes, sampler=self.sampler, scheduler=self.scheduler,
                          steps=self.steps, sigmas=None if self.sigmas is None else list(self.sigmas))


ALL_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm",
                "res_multistep")
# Computed or predicted, in the expected plans below.
C, S = True, False

# Sigma lists a user can type into a custom-sigmas node. ComfyUI's own
# euler, heun and dpm_2 divide by sigma on a step that starts at 0, and its
# multistep samplers divide by the log-sigma step, so the unpatched output
# is NaN for those on a trailing double zero or a repeat respectively; each
# list is paired with samplers whose unpatched output is finite.
REPEATED_INSIDE = Case("euler", sigmas=(1.0, 0.9, 0.9, 0.7, 0.7, 0.7, 0.4, 0.2, 0.0))
REPEATED_AT_START = Case("euler", sigmas=(1.0, 1.0, 0.8, 0.6, 0.4, 0.0))
# heun on a zero-length step evaluates twice at the same sigma on the same latent.
HEUN_REPEATED = Case("heun", sigmas=(1.0, 0.6, 0.6, 0.3, 0.0))
# The last step goes from 0 to 0: the model is evaluated at sigma 0.
LCM_TRAILING_ZEROS = Case("lcm", sigmas=(1.0, 0.8, 0.6, 0.0, 0.0))
ANCESTRAL_TRAILING_ZEROS = Case("euler_ancestral", sigmas=(1.0, 0.8, 0.6, 0.0, 0.0, 0.0))
# Noise is added back up to 0.8 (a restart); with order 2 the computed
# evaluation there meets an older point of the forecasts at the same sigma.
# It replaces that point and drops the one before it (1.0), leaving two.
RESTART_ORDER_2 = Case("euler", sigmas=(1.0, 0.8, 0.6, 0.4, 0.8, 0.3, 0.0),
                       widgets=(("order", 2), ("max_skip", 1)),
                       # max_skip 1 computes every other evaluation; the
                       # forecasts left after the restart could predict 0.3,
                       # the last step of this short run, which computes
                       plan=(C, S, C, S, C, C))
# TaylorSeer's fixed interval predicts right after the restart, from the
# block forecasts themselves.
RESTART_TAYLORSEER = Case("euler", sigmas=(1.0, 0.8, 0.6, 0.4, 0.8, 0.3, 0.2, 0.0),
                          widgets=(("order", 2), ("estimator", "taylor"), ("scheduler", "fixed"), ("interval", 2)),
                          plan=(C, C, C, S, C, S, C))
CUSTOM_SIGMA_CASES = (REPEATED_INSIDE, REPEATED_AT_START, HEUN_REPEATED, LCM_TRAILING_ZEROS,
                      ANCESTRAL_TRAILING_ZEROS, RESTART_ORDER_2, RESTART_TAYLORSEER)

CASES = {
    "flux": (
        *(Case(sampler) for sampler in ALL_SAMPLERS),
        *(Case("euler", scheduler) for scheduler in ("normal", "karras", "beta", "sgm_uniform")),
        *(Case(sampler, steps=steps) for sampler in ("euler", "heun", "dpm_2") for steps in (1, 3)),
        Case("euler", steps=50),
        *CUSTOM_SIGMA_CASES,
    ),
    "wan": (
        *(Case(sampler) for sampler in ("heun", "dpm_2", "euler_ancestral", "uni_pc", "res_multistep")),
        Case("euler", "karras"),
        *(Case("heun", steps=steps) for steps in (1, 3)),
        HEUN_REPEATED, LCM_TRAILING_ZEROS, RESTART_TAYLORSEER,
    ),
    "lumina2": (
        *(Case(sampler) for sampler in ("heun", "dpm_2", "dpmpp_2m_sde", "lcm")),
        Case("euler", "beta"),
        *(Case("dpm_2", steps=steps) for steps in (1, 3)),
        REPEATED_AT_START, ANCESTRAL_TRAILING_ZEROS, RESTART_TAYLORSEER,
    ),
}
PARAMS = [pytest.param(family, case, id=f"{family}-{case.id}") for family, cases in CASES.items() for case in cases]


def family_models():
    """The tiny model of each family, built on first use."""
    built = {}

    def get(family):
        if family not in built:
            spec = SPECS[family]
            built[family] = build(spec.config_class, spec.unet_config)
            if spec.prepare is not None:
                spec.prepare(built[family].model.diffusion_model)
        return built[family]

    return get


@pytest.fixture(scope="module")
def models(comfy):
    return family_models()


@pytest.mark.parametrize("family,case", PARAMS)
def test_sampler_and_schedule(models, nodes, family, case):
    spec, model = SPECS[family], models(family)
    reference, reference_log = case.run(spec, model, model, nodes)
    assert torch.isfinite(reference).all(), "the unpatched run itself must be finite for this case"

    exact, exact_log = case.run(spec, model, rfc(nodes, model, **THRESHOLD_ZERO), nodes)
    assert torch.equal(exact, reference)
    assert exact_log.blocks == reference_log.blocks

    widgets = {**FORCED, **dict(case.widgets)}
    latent, log = case.run(spec, model, rfc(nodes, model, **widgets), nodes)
    assert latent.shape == reference.shape
    assert torch.isfinite(latent).all()
    assert log.sigmas == reference_log.sigmas
    plan = list(case.plan) if case.plan is not None else forced_plan(reference_log.sigmas, case.schedule(model))
    assert log.computed(reference_log) == plan, reference_log.sigmas
    if not all(plan):
        assert log.blocks < reference_log.blocks


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize("case", [REPEATED_AT_START, RESTART_TAYLORSEER], ids=lambda case: case.id)
def test_cache_that_never_skips_records_odd_schedules_bit_identically(models, nodes, family, case):
    """Every evaluation is recorded into the forecasts (repeats, restarts and
    all) but none is predicted: nothing may change by a bit."""
    spec, model = SPECS[family], models(family)
    reference, reference_log = case.run(spec, model, model, nodes)
    latent, log = case.run(spec, model, rfc(nodes, model, **{**NEVER_SKIPS, **dict(case.widgets)}), nodes)
    assert torch.equal(latent, reference)
    assert log.blocks == reference_log.blocks


def comfy_schedule(model, sampler, steps, scheduler="simple") -> list[float]:
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps, "cpu", sampler, scheduler).sigmas.tolist()


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
@pytest.mark.parametrize("steps", [3, 6])
def test_two_evaluations_per_step_are_counted_exactly(models, nodes, sampler, steps):
    """heun evaluates at both ends of each step, dpm_2 at the start and at a
    mid-point sigma that is not in the schedule; both take a plain Euler
    step into sigma 0. So 2 * steps - 1 evaluations, of which forced caching
    computes the warm-up of 1 and then one in every 3."""
    spec, model = FLUX_SPEC, models("flux")
    blocks = len(counted_modules(spec, model, nodes))
    _, reference_log = run_logged(spec, model, model, nodes, sampler=sampler, steps=steps)
    _, log = run_logged(spec, model, rfc(nodes, model, **FORCED), nodes, sampler=sampler, steps=steps)
    evaluations = 2 * steps - 1
    computed = sum(forced_plan(reference_log.sigmas, comfy_schedule(model, sampler, steps)))
    assert len(log.evaluations) == evaluations
    # cfg 3 batches cond and uncond into one forward per evaluation
    assert reference_log.blocks == evaluations * blocks
    assert log.blocks == computed * blocks
    if sampler == "dpm_2":
        schedule = comfy_schedule(model, sampler, steps)
        off_schedule = [sigma for sigma in log.sigmas if not any(abs(sigma - s) < 1e-6 for s in schedule)]
        assert len(off_schedule) == steps - 1



@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "lcm"])
def test_a_noise_adding_sampler_runs_at_a_speedup_target_or_says_why_it_predicts_nothing(models, nodes, sampler,
                                                                                         caplog):
    """These samplers add fresh noise to the latent every step, which keeps
    RCS's forecast error above a usual threshold. A run longer than a short
    one is cached at target_speedup 2 instead, and says so; a short run keeps
    the threshold, predicts nothing, and its summary says why and what to
    set; a threshold at the noise floor or above is the user's and is kept."""
    spec, model = FLUX_SPEC, models("flux")
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    defaults = dict(threshold=0.1, max_skip=3, order=1, start_percent=0.0, end_percent=1.0)
    run_logged(spec, model, rfc(nodes, model, **defaults), nodes, sampler=sampler, steps=20)
    if sampler == "lcm":  # every step denoises fully: a target gained nothing there
        assert "computed 20 of 20 model evaluations" in caplog.text and "target 2x" not in caplog.text
    else:
        assert "computed 10 of 20 model evaluations (2.0x fewer, target 2x)" in caplog.text
        assert f"{sampler} adds fresh noise to the latent at every step, where threshold 0.1 would predict " \
               f"nothing" in caplog.text

    caplog.clear()
    run_logged(spec, model, rfc(nodes, model, **defaults), nodes, sampler=sampler, steps=8)
    assert "computed 8 of 8 model evaluations" in caplog.text
    assert "Nothing was predicted: the forecast error passed the threshold 0.1 at every step" in caplog.text
    assert f"{sampler} adds fresh noise to the latent at every step, which no forecast" in caplog.text
    assert "Set target_speedup" in caplog.text

    caplog.clear()
    run_logged(spec, model, rfc(nodes, model, **{**defaults, "threshold": 0.5}), nodes, sampler=sampler, steps=20)
    assert "target 2x" not in caplog.text and "used target_speedup" not in caplog.text


def test_an_ancestral_sampler_with_its_noise_off_keeps_the_threshold(models, nodes, caplog):
    """SamplerEulerAncestral with eta 0 adds no noise: the run is euler's, and
    the threshold decides as it does there."""
    import comfy.sample
    import comfy.samplers

    spec, model = FLUX_SPEC, models("flux")
    caplog.set_level("INFO", logger="ComfyUI-RFC")
    patched = rfc(nodes, model, threshold=0.1, max_skip=3, order=1, start_percent=0.0, end_percent=1.0)
    shape = (1, *spec.latent_shape)
    sampler = comfy.samplers.ksampler("euler_ancestral", {"eta": 0.0, "s_noise": 1.0})
    sigmas = comfy.samplers.KSampler(model, 20, "cpu", "euler", "simple").sigmas
    comfy.sample.sample_custom(patched, torch.randn(shape, generator=torch.Generator().manual_seed(0)), 1.0, sampler,
                               sigmas, spec.conditioning(1, 1), spec.conditioning(1, 2), torch.zeros(shape),
                               disable_pbar=True, seed=0)
    assert "target 2x" not in caplog.text and "adds fresh noise" not in caplog.text
