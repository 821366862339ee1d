"""Few-step runs (turbo and lightning models at 4 to 8 steps, cfg 1): what
each caching method buys on the bundled distilled model, against that
model's own plain run at the same step count.

The distilled model is the bundled Flux's few-step student
(`benchmarks.train_tiny_models --distil`), sampled as its recipe implies: cfg
1, with euler and with res_multistep (ComfyUI's second-order multistep
sampler). For each step count and sampler every method runs at every compute
budget it can reach:

- plain sampling with fewer steps;
- RFC as it predicts at 50 steps: whole evaluations (RFE + RCS);
- FORA: whole evaluations reused on a fixed interval;
- a first-block reuse rule (FBCache, and DBCache with one front block): the
  first block runs in every evaluation; where the change of its residual
  since the last evaluation, relative to it, is below the threshold, the
  other blocks are skipped and the residual they added last time is reused;
- RFC with a computed head (CacheConfig.computed_head): every evaluation
  computes the first blocks; a predicted one forecasts only the blocks after
  them, from the hidden state the head hands on.

Compute is the fraction of the plain run's block computations; quality is
PSNR and SSIM of the decoded images against the plain run at that step
count. Prints the best image each method gets at or below each budget, and
the rows as JSON with --json.

    python -m benchmarks.few_steps                    # about 5 minutes on 2 CPU cores
    python -m benchmarks.few_steps --json rows.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch

from .methods import Method, StandaloneSampler
from .metrics import psnr, ssim
from .run import sample_set
from .tiny_flux import DISTILLED_WEIGHTS, latent_to_pixels, load_bundled

RFC = Method("RFC (whole evaluations)", "rfe", "rcs", 1)
FORA = Method("FORA (reuse, fixed)", "reuse", "fixed", 0)
# Thresholds swept for the rules that take one: from predicting nearly
# everything to nearly nothing, so every reachable budget is found.
THRESHOLDS = tuple(round(10 ** (e / 2), 6) for e in range(-6, 3))
MAX_SKIPS = (1, 2)
# Shares of the blocks the computed head keeps: on the 6-block model, 1, 2 and 3 blocks.
HEADS = (1 / 6, 2 / 6, 3 / 6)
SAMPLERS = ("euler", "res_multistep")


@dataclass
class Row:
    model: str
    steps: int
    sampler: str
    method: str
    setting: str
    block_fraction: float
    psnr: float
    ssim: float


class FewStepSampler(StandaloneSampler):
    """The benchmark's sampler at cfg 1 (only the conditional pass runs, as
    ComfyUI runs cfg 1), with euler or res_multistep."""

    def __init__(self, model, encoder, labels, seeds, steps: int, sampler: str):
        super().__init__(model, encoder, labels, seeds, steps, cfg=1.0)
        self.sampler = sampler
        self.tokens, self.pooled = encoder(labels)

    def _velocity(self, x, sigma, transformer_options=None):
        return self._model(x, sigma, transformer_options)

    def _euler(self, velocity) -> torch.Tensor:
        if self.sampler == "euler":
            return super()._euler(velocity)
        return self._res_multistep(velocity)

    def _res_multistep(self, velocity) -> torch.Tensor:
        """The second-order multistep exponential integrator of Zhang et al.
        (arXiv 2308.02157) in log-sigma time, on the denoised prediction
        x - sigma * v; its first step and the step to sigma 0 are Euler, as
        in ComfyUI's res_multistep (eta 0)."""
        x = self.noise.clone()
        sigmas = self.sigmas
        previous_denoised = None
        for i in range(self.steps):
            sigma, following = sigmas[i], sigmas[i + 1]
            denoised = x - sigma * velocity(x, sigma)
            if previous_denoised is None or following == 0:
                x = x + (following - sigma) * (x - denoised) / sigma
            else:
                t, t_previous, t_next = -math.log(sigma), -math.log(sigmas[i - 1]), -math.log(following)
                h = t_next - t
                c2 = (t_previous - t) / h  # negative: the previous point lies behind
                phi1 = math.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1, b2 = phi1 - phi2 / c2, phi2 / c2
                x = math.exp(-h) * x + h * (b1 * denoised + b2 * previous_denoised)
            previous_denoised = denoised
        return x

    def run_first_block_reuse(self, threshold: float) -> tuple[torch.Tensor, int]:
        """FBCache's rule on this model: (latent, block computations)."""
        keys = list(self.family.streams)
        first, last = keys[0], keys[-1]
        state = {"skip": False, "previous": None, "tail": None, "head_out": None, "computed": 0}

        def joint(streams: dict) -> torch.Tensor:
            # The hidden state after the first block in the layout the last
            # block returns: Flux joins text before image for its single blocks.
            return torch.cat((streams["txt"], streams["img"]), 1) if "txt" in streams else next(iter(streams.values()))

        def intercept(key, inputs, compute):
            if key == first:
                outputs = compute()
                state["computed"] += 1
                residual = next(iter(outputs.values())) - next(iter(inputs.values()))
                previous = state["previous"]
                change = (math.inf if previous is None else
                          ((residual - previous).abs().mean() / previous.abs().mean()).item())
                state["skip"] = change < threshold and state["tail"] is not None
                state["previous"] = residual
                state["head_out"] = joint(outputs)
                return outputs
            if state["skip"]:
                if key != last:
                    return inputs
                # Blocks between pass their input on unchanged, so the last
                # block's input is the first block's output, joined.
                name = next(iter(inputs))
                return {name: inputs[name] + state["tail"]}
            outputs = compute()
            state["computed"] += 1
            if key == last:
                state["tail"] = next(iter(outputs.values())) - state["head_out"]
            return outputs

        options: dict = {}
        with self.family.intercepted(options, intercept):
            latent = self._euler(lambda x, sigma: self._velocity(x, sigma, options))
        return latent, state["computed"]


def frontier(rows: list[Row]) -> list[Row]:
    """Rows no other row of the method beats on both compute and PSNR."""
    best = []
    for row in sorted(rows, key=lambda r: (r.block_fraction, -r.psnr)):
        if not best or row.psnr > best[-1].psnr:
            best.append(row)
    return best


def measure(model, encoder, labels, seeds, steps: int, sampler: str, name: str) -> list[Row]:
    run_sampler = FewStepSampler(model, encoder, labels, seeds, steps, sampler)
    full = steps * run_sampler.block_count
    reference = latent_to_pixels(run_sampler.run().latent)
    rows = []

    def add(method: str, setting: str, latent: torch.Tensor, block_calls: int) -> None:
        images = latent_to_pixels(latent)
        rows.append(Row(name, steps, sampler, method, setting, round(block_calls / full, 4),
                        round(psnr(images, reference), 2), round(ssim(images, reference), 4)))

    for fewer in range(1, steps):
        plain = FewStepSampler(model, encoder, labels, seeds, fewer, sampler)
        add("plain, fewer steps", f"{fewer} steps", plain.run().latent, fewer * run_sampler.block_count)
    for interval in (2, 3, 4):
        result = run_sampler.run(FORA, interval)
        add(FORA.name, f"interval {interval}", result.latent, result.block_calls)
    for threshold in THRESHOLDS:
        latent, calls = run_sampler.run_first_block_reuse(threshold)
        add("first-block reuse (FBCache)", f"threshold {threshold:g}", latent, calls)
        for max_skip in MAX_SKIPS:
            result = run_sampler.run(RFC, threshold, max_skip)
            add(RFC.name, f"threshold {threshold:g}, max_skip {max_skip}", result.latent, result.block_calls)
            for head in HEADS:
                config = run_sampler_config(threshold, max_skip, head)
                result = run_sampler._run_blocks(config, 0.0)
                add("RFC, computed head", f"head {head:.2f}, threshold {threshold:g}, max_skip {max_skip}",
                    result.latent, result.block_calls)
    return rows


def run_sampler_config(threshold: float, max_skip: int, head: float):
    from .methods import rfc_core

    return rfc_core().CacheConfig(estimator="rfe", scheduler="rcs", order=1, threshold=threshold,
                                  max_skip=max_skip, computed_head=head)


def best_at_or_below(rows: list[Row], method: str, budget: float) -> Row | None:
    within = [r for r in rows if r.method == method and r.block_fraction <= budget + 1e-9]
    return max(within, key=lambda r: r.psnr, default=None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(args.threads, torch.get_num_threads()))
    model, encoder, _ = load_bundled(DISTILLED_WEIGHTS)
    labels, seeds = sample_set(args.samples, len(encoder.names))
    rows: list[Row] = []
    methods = ("plain, fewer steps", FORA.name, "first-block reuse (FBCache)", RFC.name, "RFC, computed head")
    for sampler in args.samplers:
        for steps in args.steps:
            measured = measure(model, encoder, labels, seeds, steps, sampler, "tiny_flux_distilled")
            rows += measured
            print(f"\n{steps} steps, {sampler}, cfg 1: best PSNR (dB) / SSIM at or below each share of the "
                  f"plain run's block computations (the setting that got it in brackets)\n")
            budgets = sorted({r.block_fraction for r in measured if r.method == "plain, fewer steps"} | {0.77})
            print("| method | " + " | ".join(f"<= {b:.2f}" for b in budgets) + " |")
            print("|---|" + "---|" * len(budgets))
            for method in methods:
                cells = []
                for budget in budgets:
                    best = best_at_or_below(measured, method, budget)
                    cells.append("-" if best is None else
                                 f"{best.psnr:.2f} / {best.ssim:.3f} ({best.block_fraction:.2f})")
                print(f"| {method} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([row.__dict__ for row in rows], handle, indent=1)


if __name__ == "__main__":
    main()
