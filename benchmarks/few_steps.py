"""What RFC buys at 4 to 8 steps (distilled and turbo models such as FLUX.2
Klein and Z-Image Turbo run there): for each step count and setting, the
full computations RFC makes and its quality against full compute at that
step count, next to the cheaper alternative of simply sampling with that
many steps. Bundled tiny Flux, cfg 1 (one evaluation per step, as turbo
models run).

    python -m benchmarks.few_steps          # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch

from .methods import Method, StandaloneSampler
from .metrics import psnr
from .run import sample_set
from .tiny_flux import latent_to_pixels, load_bundled

RFC = Method("RFC m=1 (RFE + RCS)", "rfe", "rcs", 1)
# (threshold, max_skip): the defaults, and the most a few-step run can skip.
SETTINGS = ((0.1, 3), (0.1, 1), (0.3, 1), (0.3, 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, encoder, _ = load_bundled()
    labels, seeds = sample_set(args.samples, len(encoder.names))

    def sampler(steps: int) -> StandaloneSampler:
        return StandaloneSampler(model, encoder, labels, seeds, steps, cfg=1.0)

    plain = {steps: latent_to_pixels(sampler(steps).run().latent) for steps in range(2, max(args.steps) + 1)}
    print("| steps | threshold | max_skip | full computations | PSNR vs full compute (dB) | "
          "plain sampling with that many steps: PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        run_sampler = sampler(steps)
        for threshold, max_skip in SETTINGS:
            result = run_sampler.run(RFC, threshold, max_skip)
            fewer = plain.get(result.nfc)
            fewer_psnr = "-" if fewer is None or result.nfc == steps else f"{psnr(fewer, plain[steps]):.2f}"
            quality = psnr(latent_to_pixels(result.latent), plain[steps])
            print(f"| {steps} | {threshold:g} | {max_skip} | {result.nfc} | "
                  f"{'identical' if result.nfc == steps else f'{quality:.2f}'} | {fewer_psnr} |")


if __name__ == "__main__":
    main()
