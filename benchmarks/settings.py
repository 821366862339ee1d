"""Benchmark: what RFC's default (RFE + RCS, order 1) computes and how close
it stays to full compute, per threshold, step count and max_skip, on each
bundled model. The README's settings per model come from this table
(docs/benchmark.md, "Choosing the defaults").

    python -m benchmarks.settings                  # both models, about 4 minutes on 2 CPU cores
    python -m benchmarks.settings --model nextdit
"""

from __future__ import annotations

import argparse
import logging

import torch

from .methods import METHODS, StandaloneSampler
from .metrics import psnr
from .run import bundled_models, sample_set
from .tiny_flux import latent_to_pixels

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
# (steps, max_skip)
RUNS = ((20, 3), (30, 3), (50, 3), (50, 4))
RFC = next(method for method in METHODS if method.name == "RFC m=1 (RFE + RCS)")


def table(key: str, samples: int) -> str:
    load, _, name = bundled_models()[key]
    model, encoder, _ = load()
    labels, seeds = sample_set(samples, len(encoder.names))
    lines = [f"### {name[0].upper()}{name[1:]}: NFC / PSNR (dB) against full compute, {samples} samples, cfg 3", "",
             "| steps, max_skip | " + " | ".join(f"threshold {t:g}" for t in THRESHOLDS) + " |",
             "|---|" + "---|" * len(THRESHOLDS)]
    for steps, max_skip in RUNS:
        sampler = StandaloneSampler(model, encoder, labels, seeds, steps, 3.0)
        reference = latent_to_pixels(sampler.run(None).latent)
        cells = []
        for threshold in THRESHOLDS:
            result = sampler.run(RFC, threshold, max_skip)
            cells.append(f"{result.nfc} / {psnr(latent_to_pixels(result.latent), reference):.1f}")
        lines.append(f"| {steps}, {max_skip} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["all", "flux", "nextdit"], default="all")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    for key in (bundled_models() if args.model == "all" else [args.model]):
        print(table(key, args.samples))
        print()


if __name__ == "__main__":
    main()
