"""The caching methods the benchmark compares, and samplers that run them on
the bundled models without ComfyUI.

Block-level methods run through the pack's own runtime (`SamplingSession`,
and `CachedBlock` or `CachedForward`: the code the nodes install, through
`patches_replace` on Flux and object-patched block forwards on NextDiT), so
what is measured here is what ships. Two baselines are written here from
their papers' descriptions:

- EasyCache's rule (Zhou et al. 2025), whole model: predict the output
  change from the input change times the last measured transformation rate,
  and reuse the last output-minus-input difference until the accumulated
  prediction passes the threshold.
- Spectrum (Han et al., CVPR 2026, arXiv 2603.01623): forecast the output
  of the whole block stack (the hidden state the final layer reads) from a
  ridge-regression fit of Chebyshev polynomials (T0 to T3 or T0 to T4) over
  the run's time, normalised sigma or the step index as the authors' code
  has it, through the newest full computations, mixed with the linear
  forecast through the last two; full computations on a schedule whose gaps
  widen along the run. A skipped step runs no block at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .tiny_flux import TinyFlux, flux_sigmas
from .tiny_nextdit import TinyNextDiT, shifted_flow_sigmas

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_rfc"


def load_pack():
    """The pack as an importable package, whatever its folder is called
    (custom_nodes/ComfyUI-RFC has a hyphen), so its relative imports work."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = package
    spec.loader.exec_module(package)
    logging.getLogger("ComfyUI-RFC").setLevel(logging.WARNING)
    return package


def rfc_core():
    """The pack's own rfc_core, the one its runtime uses."""
    load_pack()
    return sys.modules[f"{PACK_NAME}.rfc_core"]


@dataclass(frozen=True)
class Method:
    name: str
    estimator: str | None  # None: a baseline written here (EasyCache's rule, Spectrum)
    scheduler: str  # "fixed", "rcs", "easycache" or "spectrum"
    order: int = 0
    granularity: str = "blocks"  # or "model": the pack's fallback for models without a block adapter
    # The memory layout's widgets (rfc_core.memory): how residual slots are
    # stored and how many blocks one cached unit spans (0: the plan's choice).
    cache_dtype: str = "auto"
    cache_span: int = 0

    @property
    def searches_threshold(self) -> bool:
        return self.scheduler in ("rcs", "easycache")

    def config(self, setting, max_skip: int):
        CacheConfig = rfc_core().CacheConfig
        if self.scheduler == "fixed":
            return CacheConfig(estimator=self.estimator, scheduler="fixed", order=self.order, interval=setting,
                               max_skip=max(1, setting - 1))
        return CacheConfig(estimator=self.estimator, scheduler="rcs", order=self.order, threshold=setting,
                           max_skip=max_skip, cache_dtype=self.cache_dtype, cache_span=self.cache_span)


METHODS = (
    Method("FORA (reuse, fixed)", "reuse", "fixed", 0),
    Method("TaylorSeer m=1 (fixed)", "taylor", "fixed", 1),
    Method("TaylorSeer m=2 (fixed)", "taylor", "fixed", 2),
    Method("RFE m=1 (fixed)", "rfe", "fixed", 1),
    Method("RCS m=1 (Taylor)", "taylor", "rcs", 1),
    Method("RFC m=1 (RFE + RCS)", "rfe", "rcs", 1),
    Method("RFC m=2 (RFE + RCS)", "rfe", "rcs", 2),
    Method("RFC m=1, whole model", "rfe", "rcs", 1, "model"),
    Method("EasyCache rule (whole model)", None, "easycache"),
    Method("Spectrum (stack forecast)", None, "spectrum"),
)

# Spectrum's published knobs, searched per budget: the mix weight of the
# Chebyshev fit against the linear forecast (the paper uses 0.5 to 1), how
# fast the gaps between full computations widen (1: evenly spaced), how
# many of the newest full computations the fit uses (None: all of them),
# the fit's time variable and its number of Chebyshev terms.
SPECTRUM_RIDGE = 0.1
SPECTRUM_MIXES = (0.5, 1.0)
# "sigma": 2 sigma - 1; "step": the step index, as the authors' code fits
# over it (T0 to T4 there, M = 4). Each wins cells (16 samples, 2026-12-06):
# the step index at NFC 8 on both models and at NFC 6 on the NextDiT, five
# terms at 8 of the 10 budgets, four at NFC 25 and 6 on the NextDiT.
SPECTRUM_TIMES = ("sigma", "step")
SPECTRUM_TERMS = (4, 5)
# Growth 1.25 was searched as well on both bundled models, and evenly spaced
# computations won every budget from 25 to 6 on both (2026-12-01), so the
# demo leaves it out to stay under 10 minutes.
SPECTRUM_GROWTHS = (1.0,)
# The whole run in the fit (window None) was searched as well, with both
# time variables and both term counts (2026-12-06): the newest 6 won every
# budget from 25 to 8 on both models (at NFC 8 29.92 against 29.07 dB on the
# Flux model, 35.10 against 33.67 on the NextDiT), and at NFC 6 the six
# computations are the whole run, so the demo leaves it out to stay near
# 10 minutes.
SPECTRUM_WINDOWS = (6,)


@dataclass(frozen=True)
class SpectrumSetting:
    first_gap: float  # the schedule's first gap, in steps: what the search moves to hit an NFC
    growth: float  # each gap is this times the one before
    mix: float  # weight of the Chebyshev fit; 1 - mix on the linear forecast
    window: int | None = None  # newest full computations the fit uses; None: all
    time: str = "sigma"  # the fit's time variable: "sigma" or "step" (see fit_time)
    terms: int = 4  # Chebyshev terms T0 .. T(terms - 1)

    def full_steps(self, steps: int) -> set[int]:
        """Full computations: the first step, then gaps first_gap * growth^j."""
        full, position, gap = {0}, 0.0, self.first_gap
        while True:
            position += max(1.0, gap)
            if round(position) >= steps:
                return full
            full.add(round(position))
            gap *= self.growth

    def fit_time(self, step: int, sigma: float, steps: int) -> float:
        """The fit's time at a step, in [-1, 1]: 2 sigma - 1, or the step
        index mapped from [0, steps] as the authors' code maps it (from [0, 50]
        at its 50 steps)."""
        return 2.0 * sigma - 1.0 if self.time == "sigma" else 2.0 * step / steps - 1.0


def chebyshev(x: torch.Tensor, count: int) -> torch.Tensor:
    """T_0(x) .. T_{count-1}(x), one column each."""
    columns = [torch.ones_like(x), x]
    while len(columns) < count:
        columns.append(2 * x * columns[-1] - columns[-2])
    return torch.stack(columns[:count], dim=-1)


def spectrum_weights(times: list[float], at: float, mix: float, terms: int) -> list[float]:
    """Weight of each recorded feature in Spectrum's forecast at time `at`:
    the ridge fit's prediction phi(at)^T (Phi^T Phi + lambda I)^-1 Phi^T H over
    `terms` Chebyshev polynomials is linear in the recorded features H, mixed
    with the line through the last two. Times are in [-1, 1]."""
    if len(times) == 1:
        return [1.0]
    nodes = torch.tensor(times, dtype=torch.float64)
    basis = chebyshev(nodes, terms)
    gram = basis.T @ basis + SPECTRUM_RIDGE * torch.eye(terms, dtype=torch.float64)
    fitted = basis @ torch.linalg.solve(gram, chebyshev(torch.tensor([at], dtype=torch.float64), terms)[0])
    linear = [0.0] * len(times)
    (t0, t1) = times[-2:]
    linear[-1], linear[-2] = (at - t0) / (t1 - t0), (t1 - at) / (t1 - t0)
    return [mix * f + (1 - mix) * l for f, l in zip(fitted.tolist(), linear)]


class EasyCacheRule:
    """Whole-model cache with EasyCache's decision rule."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.last_input = None
        self.last_output = None
        self.difference = None
        self.rate = None
        self.accumulated = 0.0
        self.computed = 0

    def __call__(self, model_call, x: torch.Tensor) -> torch.Tensor:
        input_change = None
        if self.last_input is not None:
            input_change = (x - self.last_input).abs().mean().item()
            if self.rate is not None:
                self.accumulated += self.rate * input_change / self.last_output.abs().mean().item()
                if self.accumulated < self.threshold:
                    return x + self.difference
                self.accumulated = 0.0
        output = model_call(x)
        self.computed += 1
        if self.last_output is not None and input_change:
            self.rate = (output - self.last_output).abs().mean().item() / input_change
        self.last_input, self.last_output, self.difference = x, output, output - x
        return output

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.last_input, self.last_output, self.difference)
                   if t is not None)


def seeded_noise(seeds: list[int], channels: int, size: int = 16) -> torch.Tensor:
    """One latent of noise per seed, each from its own generator, so a sample
    does not depend on the others in the set (and ComfyUI gets the same noise)."""
    return torch.cat([torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
                      for seed in seeds])


@dataclass
class SampleResult:
    latent: torch.Tensor
    nfc: int
    block_calls: int
    cache_bytes: int
    seconds: float
    # Per model evaluation, whether it was computed (block-level runs).
    computed: tuple[bool, ...] = ()
    # Block-level runs: the cache's projection and the layout the plan chose
    # (rfc_core.memory), for what the layout costs at other dtypes and sizes.
    footprint: object = None
    layout: object = None


class FluxFamily:
    """The bundled Flux: blocks through `patches_replace`, as ComfyUI's Flux."""

    adapter_family = "flux"

    def __init__(self, model: TinyFlux):
        self.model = model
        self.streams = {("double_block", i): ("img", "txt") for i in range(len(model.double_blocks))}
        self.streams.update({("single_block", i): ("img",) for i in range(len(model.single_blocks))})

    @staticmethod
    def sigmas(steps: int) -> torch.Tensor:
        return flux_sigmas(steps)

    def call(self, x, sigma, tokens, pooled, options):
        return self.model(x, sigma, tokens, pooled, options)

    @contextlib.contextmanager
    def intercepted(self, options: dict, intercept):
        """Every block call goes to intercept(key, inputs, compute) -> outputs,
        streams as dicts; compute() runs the block."""
        def entry(key):
            def replaced(args, extra):
                return intercept(key, {s: args[s] for s in self.streams[key]}, lambda: extra["original_block"](args))
            return replaced

        options["patches_replace"] = {"dit": {key: entry(key) for key in self.streams}}
        yield

    @contextlib.contextmanager
    def cached(self, options: dict, from_runtime, adapter, wrap=None):
        replace = {key: from_runtime.CachedBlock(*key) for key in adapter.block_keys(self.model)}
        if wrap is not None:
            replace = {key: wrap(entry) for key, entry in replace.items()}
        options["patches_replace"] = {"dit": replace}
        yield


class NextDiTFamily:
    """The bundled NextDiT: no block patch point, so each cached block's
    `forward` (the noise refiners', then the joint layers') is replaced for
    the run, as the node's object patch does in ComfyUI."""

    adapter_family = "lumina2"
    GROUPS = (("noise_refiner", "noise_refiner"), ("layer", "layers"))

    def __init__(self, model: TinyNextDiT):
        self.model = model
        self.streams = {key: ("x",) for key, _ in self._blocks()}

    def _blocks(self):
        """((kind, index), block) in the order the model runs them."""
        return [((kind, index), block) for kind, attribute in self.GROUPS
                for index, block in enumerate(getattr(self.model, attribute))]

    @staticmethod
    def sigmas(steps: int) -> torch.Tensor:
        return shifted_flow_sigmas(steps)

    def call(self, x, sigma, tokens, pooled, options):
        return self.model(x, sigma, tokens, options)

    @contextlib.contextmanager
    def _forwards(self, make):
        blocks = self._blocks()
        for key, block in blocks:
            block.forward = make(key, block)
        try:
            yield
        finally:
            for _, block in blocks:
                del block.forward

    def intercepted(self, options: dict, intercept):
        def make(key, block):
            original = type(block).forward.__get__(block)

            def forward(x, *args, **kwargs):
                return intercept(key, {"x": x}, lambda: {"x": original(x, *args, **kwargs)})["x"]
            return forward

        return self._forwards(make)

    def cached(self, options: dict, from_runtime, adapter, wrap=None):
        if wrap is not None:
            raise ValueError("the sequence-parallel benchmark runs on the Flux model only")

        def make(key, block):
            block_forward = type(block).forward.__get__(block)
            return from_runtime.CachedForward(*key, ("x",), block_forward, block_forward,
                                             adapter.block_path(self.model, *key))

        return self._forwards(make)


def family_of(model) -> FluxFamily | NextDiTFamily:
    return NextDiTFamily(model) if isinstance(model, TinyNextDiT) else FluxFamily(model)


class StandaloneSampler:
    """Euler sampling of a bundled model with real classifier-free guidance
    (cond and uncond batched in one evaluation, as ComfyUI does on one GPU)."""

    def __init__(self, model: TinyFlux | TinyNextDiT, encoder, labels: torch.Tensor, seeds: list[int], steps: int,
                 cfg: float):
        self.model = model
        self.family = family_of(model)
        self.steps = steps
        self.cfg = cfg
        self.sigmas = self.family.sigmas(steps)
        self.noise = seeded_noise(seeds, model.config["in_channels"])
        self.tokens, self.pooled = encoder(torch.cat([labels, torch.full_like(labels, encoder.empty)]))
        self.block_count = len(self.family.streams)

    def _model(self, doubled_x, sigma, transformer_options=None):
        return self.family.call(doubled_x, sigma.repeat(doubled_x.shape[0]), self.tokens, self.pooled,
                                transformer_options)

    def _guide(self, both: torch.Tensor) -> torch.Tensor:
        cond, uncond = both.chunk(2)
        return uncond + self.cfg * (cond - uncond)

    def _velocity(self, x, sigma, transformer_options=None):
        return self._guide(self._model(torch.cat([x, x]), sigma, transformer_options))

    @torch.no_grad()
    def run(self, method: Method | None = None, setting=None, max_skip: int = 50) -> SampleResult:
        start = time.perf_counter()
        if method is None:
            latent = self._euler(lambda x, sigma: self._velocity(x, sigma))
            return SampleResult(latent, self.steps, self.steps * self.block_count, 0, time.perf_counter() - start)
        if method.scheduler == "easycache":
            return self._run_easycache(setting, start)
        if method.scheduler == "spectrum":
            return self._run_spectrum(setting, start)
        if method.granularity == "model":
            return self._run_whole_model(method.config(setting, max_skip), start)
        return self._run_blocks(method.config(setting, max_skip), start)

    def _euler(self, velocity) -> torch.Tensor:
        x = self.noise.clone()
        for i in range(self.steps):
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * velocity(x, self.sigmas[i])
        return x

    def _run_blocks(self, config, start, wrap=None, rank_sum=None) -> SampleResult:
        """wrap(entry): what the model calls in place of each block's
        `CachedBlock` (benchmarks.sequence_parallel splits its tokens);
        rank_sum: the session's sum over sequence-parallel ranks."""
        load_pack()
        from_runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
        family = self.family.adapter_family
        adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for(family)
        first = adapter.block_keys(self.model)[0]
        settings = from_runtime.CacheSettings(config, family, "blocks", adapter, first, None)
        session = from_runtime.SamplingSession(settings, self.model, None, self.sigmas.tolist(), rank_sum)
        options = {from_runtime.SESSION_KEY: session, "cond_or_uncond": [0, 1]}

        def model_call(x, sigma):
            # Through the pack's APPLY_MODEL wrapper, which object-patched
            # blocks find their session through.
            return from_runtime.apply_model_wrapper(lambda *_: self._velocity(x, sigma, options), x, sigma,
                                                    transformer_options=options)

        def velocity(x, sigma):
            return session.evaluate(float(sigma), lambda: model_call(x, sigma))

        with self.family.cached(options, from_runtime, adapter, wrap):
            latent = self._euler(velocity)
        session.finish()
        run = session.run
        if session.fault_notes:
            raise RuntimeError(f"caching failed inside the benchmark: {'; '.join(session.fault_notes)}")
        return SampleResult(latent, run.computed_evaluations, run.modules_computed, run.peak_bytes,
                            time.perf_counter() - start, tuple(e.computed for e in run.evaluations),
                            session.footprint, session.layout)

    def _run_whole_model(self, config, start) -> SampleResult:
        """The pack's whole-model granularity: the cached module maps the noisy
        latent to the denoised one, as ComfyUI's APPLY_MODEL does."""
        load_pack()
        from_runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
        settings = from_runtime.CacheSettings(config, self.family.adapter_family, "model", None,
                                              from_runtime.MODEL_MODULE, None)
        session = from_runtime.SamplingSession(settings, self.model, None)
        options = {"cond_or_uncond": [0, 1]}

        def velocity(x, sigma):
            doubled = torch.cat([x, x])

            def guided():
                denoised = session.run_model(lambda: doubled - sigma * self._model(doubled, sigma), doubled, options)
                return self._guide((doubled - denoised) / sigma)

            return session.evaluate(float(sigma), guided)

        latent = self._euler(velocity)
        session.finish()
        run = session.run
        if session.fault_notes:
            raise RuntimeError(f"caching failed inside the benchmark: {'; '.join(session.fault_notes)}")
        return SampleResult(latent, run.computed_evaluations, run.computed_evaluations * self.block_count,
                            run.peak_bytes, time.perf_counter() - start)

    def _run_easycache(self, threshold, start) -> SampleResult:
        cache = EasyCacheRule(threshold)
        peak = 0

        def velocity(x, sigma):
            nonlocal peak
            # The cached module is the diffusion model call on cond and uncond
            # together, as EasyCache wraps it in ComfyUI.
            both = cache(lambda doubled: self._model(doubled, sigma), torch.cat([x, x]))
            peak = max(peak, cache.nbytes())
            return self._guide(both)

        latent = self._euler(velocity)
        return SampleResult(latent, cache.computed, cache.computed * self.block_count, peak,
                            time.perf_counter() - start)

    def _run_spectrum(self, setting: SpectrumSetting, start) -> SampleResult:
        full_steps = setting.full_steps(self.steps)
        last_block = list(self.family.streams)[-1]
        times: list[float] = []
        features: list[torch.Tensor] = []
        state = {"step": 0}
        peak = 0

        def fit_time(step: int) -> float:
            return setting.fit_time(step, float(self.sigmas[step]), self.steps)

        def intercept(key, inputs, compute):
            step = state["step"]
            if step in full_steps:
                outputs = compute()
                if key == last_block:
                    times.append(fit_time(step))
                    features.append(next(iter(outputs.values())))
                    if setting.window is not None:
                        # Only the fit's window is kept, as Spectrum keeps it.
                        del times[:-setting.window], features[:-setting.window]
                return outputs
            if key != last_block:
                return inputs  # a skipped step runs no block
            weights = spectrum_weights(times, fit_time(step), setting.mix, setting.terms)
            forecast = sum(w * f for w, f in zip(weights, features))
            return {next(iter(inputs)): forecast}

        options: dict = {}

        def velocity(x, sigma):
            nonlocal peak
            output = self._velocity(x, sigma, options)
            peak = max(peak, sum(f.numel() * f.element_size() for f in features))
            state["step"] += 1
            return output

        with self.family.intercepted(options, intercept):
            latent = self._euler(velocity)
        return SampleResult(latent, len(full_steps), len(full_steps) * self.block_count, peak,
                            time.perf_counter() - start)
