"""The caching methods the benchmark compares, and samplers that run them on
the bundled model without ComfyUI.

Block-level methods run through the pack's own runtime (`SamplingSession`
and `CachedBlock`, the code the nodes install), so what is measured here is
what ships. The whole-model baseline follows EasyCache's rule (Zhou et al.
2025), written from its description: predict the output change from the
input change times the last measured transformation rate, and reuse the last
output-minus-input difference until the accumulated prediction passes the
threshold.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .tiny_flux import TinyFlux, flux_sigmas

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
    estimator: str | None  # None: the whole-model EasyCache rule
    scheduler: str  # "fixed", "rcs" or "easycache"
    order: int = 0
    granularity: str = "blocks"  # or "model": the pack's fallback for models without a block adapter

    @property
    def searches_threshold(self) -> bool:
        return self.scheduler != "fixed"

    def config(self, setting, max_skip: int):
        CacheConfig = rfc_core().CacheConfig
        if self.scheduler == "fixed":
            return CacheConfig(estimator=self.estimator, scheduler="fixed", order=self.order, interval=setting,
                               max_skip=max(1, setting - 1))
        return CacheConfig(estimator=self.estimator, scheduler="rcs", order=self.order, threshold=setting,
                           max_skip=max_skip)


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
)


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


class StandaloneSampler:
    """Euler sampling of the bundled model with real classifier-free guidance
    (cond and uncond batched in one evaluation, as ComfyUI does on one GPU)."""

    def __init__(self, model: TinyFlux, encoder, labels: torch.Tensor, seeds: list[int], steps: int, cfg: float):
        self.model = model
        self.steps = steps
        self.cfg = cfg
        self.sigmas = flux_sigmas(steps)
        self.noise = seeded_noise(seeds, model.config["in_channels"])
        self.tokens, self.pooled = encoder(torch.cat([labels, torch.full_like(labels, encoder.empty)]))
        self.block_count = len(model.double_blocks) + len(model.single_blocks)

    def _model(self, doubled_x, sigma, transformer_options=None):
        return self.model(doubled_x, sigma.repeat(doubled_x.shape[0]), self.tokens, self.pooled, transformer_options)

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
        adapter = sys.modules[f"{PACK_NAME}.nodes.adapters"].adapter_for("flux")
        settings = from_runtime.CacheSettings(config, "flux", "blocks", adapter, ("double_block", 0), None)
        session = from_runtime.SamplingSession(settings, self.model, None, self.sigmas.tolist(), rank_sum)
        replace = {key: from_runtime.CachedBlock(*key) for key in adapter.block_keys(self.model)}
        if wrap is not None:
            replace = {key: wrap(entry) for key, entry in replace.items()}
        options = {"patches_replace": {"dit": replace}, from_runtime.SESSION_KEY: session, "cond_or_uncond": [0, 1]}

        def velocity(x, sigma):
            return session.evaluate(float(sigma), lambda: self._velocity(x, sigma, options))

        latent = self._euler(velocity)
        session.finish()
        run = session.run
        if session.fault_notes:
            raise RuntimeError(f"caching failed inside the benchmark: {'; '.join(session.fault_notes)}")
        return SampleResult(latent, run.computed_evaluations, run.modules_computed, run.peak_bytes,
                            time.perf_counter() - start, tuple(e.computed for e in run.evaluations))

    def _run_whole_model(self, config, start) -> SampleResult:
        """The pack's whole-model granularity: the cached module maps the noisy
        latent to the denoised one, as ComfyUI's APPLY_MODEL does."""
        load_pack()
        from_runtime = sys.modules[f"{PACK_NAME}.nodes.runtime"]
        settings = from_runtime.CacheSettings(config, "flux", "model", None, from_runtime.MODEL_MODULE, None)
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
