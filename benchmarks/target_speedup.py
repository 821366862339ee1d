"""Benchmark: does `target_speedup` hit its target, and at what quality?

For each step count, max_skip and target, one run with the target, then a
sweep of hand-set thresholds (same max_skip) on the same 16 samples: the
table gives the achieved ratio of model evaluations to full computations
against the target, and PSNR against full compute next to the best hand-set
threshold that made the same number of full computations and the range of
all those that did. The last line sums up the comparison over the table.

    python -m benchmarks.target_speedup        # about 10 minutes on 2 CPU cores
    python -m benchmarks.target_speedup --steps 20 30 50 --max-skip 5 --targets 2 2.5 3 3.5 4 5
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

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

    def best_speedup(self, sigmas: list[float]) -> float:
        """The highest speedup warm-up and max_skip allow on this schedule."""
        return rfc_core().RFCRun(self._config, None, schedule=sigmas).best_speedup()


@dataclass
class HandSet:
    """The swept thresholds that made one NFC."""

    best_psnr: float = -math.inf
    best_threshold: float = math.nan
    worst_psnr: float = math.inf

    def add(self, quality: float, threshold: float) -> None:
        if quality > self.best_psnr:
            self.best_psnr, self.best_threshold = quality, threshold
        self.worst_psnr = min(self.worst_psnr, quality)


def hand_set_by_nfc(sampler, reference, max_skip: int) -> dict[int, HandSet]:
    low, high, count = SWEEP
    by_nfc: dict[int, HandSet] = {}
    for i in range(count):
        threshold = 10 ** (low + (high - low) * i / (count - 1))
        result = sampler.run(RFC, threshold, max_skip)
        by_nfc.setdefault(result.nfc, HandSet()).add(psnr(latent_to_pixels(result.latent), reference), threshold)
    return by_nfc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5])
    parser.add_argument("--max-skip", type=int, nargs="+", default=[3])
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(args.samples, len(encoder.names))
    print(f"### target_speedup on the bundled tiny Flux, {args.samples} samples, Euler, cfg {args.cfg}\n")
    print("| steps | max_skip | target | full computations | achieved | off target | PSNR (dB) | best hand-set "
          "threshold at that NFC | its PSNR (dB) | difference (dB) | PSNR range of hand-set thresholds at that NFC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    differences = []
    for steps in args.steps:
        sampler = StandaloneSampler(model, encoder, labels, seeds, steps, args.cfg)
        reference = latent_to_pixels(sampler.run(None).latent)
        for max_skip in args.max_skip:
            hand_set = hand_set_by_nfc(sampler, reference, max_skip)
            for target in args.targets:
                if target > max_skip + 1:
                    continue
                method = TargetMethod(target, max_skip)
                reach = method.best_speedup(sampler.sigmas.tolist())
                result = sampler.run(method)
                quality = psnr(latent_to_pixels(result.latent), reference)
                achieved = steps / result.nfc
                hand = hand_set.get(result.nfc)
                if hand is None:
                    hand_cells = "none made that NFC | - | - | -"
                else:
                    difference = quality - hand.best_psnr
                    hand_cells = (f"{hand.best_threshold:.3g} | {hand.best_psnr:.2f} | {difference:+.2f} | "
                                  f"{hand.worst_psnr:.2f} to {hand.best_psnr:.2f}")
                    if target <= reach:
                        differences.append(difference)
                off = f"{achieved / target - 1:+.1%}" + ("" if target <= reach else f" (beyond reach: {reach:.2f})")
                print(f"| {steps} | {max_skip} | {target:g} | {result.nfc} | {achieved:.2f} | {off} | {quality:.2f} | "
                      f"{hand_cells} |", flush=True)
    if differences:
        at_least = sum(d >= -0.005 for d in differences)
        print(f"\nAgainst the best hand-set threshold at the same NFC, over the {len(differences)} rows with a "
              f"reachable target and a hand-set match: "
              f"{sum(differences) / len(differences):+.2f} dB on average, at least as good in {at_least}, "
              f"worst {min(differences):+.2f} dB.")


if __name__ == "__main__":
    main()
