"""Benchmark: does `target_speedup` hit its target, and at what quality?

For each step count and target, one run with the target, then a sweep of
hand-set thresholds (same max_skip) on the same 16 samples: the table gives
the achieved ratio of model evaluations to full computations against the
target, and PSNR against full compute next to the best hand-set threshold
that made the same number of full computations.

    python -m benchmarks.target_speedup        # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import math

from .methods import METHODS, StandaloneSampler, rfc_core
from .metrics import psnr
from .run import sample_set
from .tiny_flux import latent_to_pixels, load_bundled

RFC = next(m for m in METHODS if m.name == "RFC m=1 (RFE + RCS)")
# log10 range and count of the hand-set thresholds swept.
SWEEP = (-3.0, 0.5, 48)


class TargetMethod:
    """RFC with a speedup target, in the form StandaloneSampler.run takes."""

    scheduler = "rcs"
    granularity = "blocks"

    def __init__(self, target: float, max_skip: int):
        self._config = rfc_core().CacheConfig(target_speedup=target, max_skip=max_skip)

    def config(self, setting, max_skip):
        return self._config


def best_by_nfc(sampler, reference, max_skip: int) -> dict[int, tuple[float, float]]:
    """For each NFC some swept threshold made: (best PSNR, its threshold)."""
    low, high, count = SWEEP
    best: dict[int, tuple[float, float]] = {}
    for i in range(count):
        threshold = 10 ** (low + (high - low) * i / (count - 1))
        result = sampler.run(RFC, threshold, max_skip)
        quality = psnr(latent_to_pixels(result.latent), reference)
        if quality > best.get(result.nfc, (-math.inf,))[0]:
            best[result.nfc] = (quality, threshold)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5])
    parser.add_argument("--max-skip", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(args.samples, len(encoder.names))
    print(f"### target_speedup on the bundled tiny Flux, {args.samples} samples, Euler, cfg {args.cfg}, "
          f"max_skip {args.max_skip}\n")
    print("| steps | target | full computations | achieved | off target | PSNR (dB) | best hand-set threshold "
          "at that NFC | its PSNR (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        sampler = StandaloneSampler(model, encoder, labels, seeds, steps, args.cfg)
        reference = latent_to_pixels(sampler.run(None).latent)
        best = best_by_nfc(sampler, reference, args.max_skip)
        for target in args.targets:
            result = sampler.run(TargetMethod(target, args.max_skip))
            quality = psnr(latent_to_pixels(result.latent), reference)
            achieved = steps / result.nfc
            hand = best.get(result.nfc)
            hand_cells = f"{hand[1]:.3g} | {hand[0]:.2f}" if hand else "none made that NFC | -"
            print(f"| {steps} | {target:g} | {result.nfc} | {achieved:.2f} | {achieved / target - 1:+.1%} | "
                  f"{quality:.2f} | {hand_cells} |", flush=True)


if __name__ == "__main__":
    main()
