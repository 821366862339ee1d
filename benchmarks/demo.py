"""Demo and quick benchmark without ComfyUI: RFC against FORA and TaylorSeer
on a small adaLN transformer in plain torch, sampled with 50 Euler steps of
flow matching.

The model has random weights (the trained model and the real benchmark come
with the evidence work), so absolute quality numbers say little about real
images; what the table does show is how many model evaluations each method
computes, how real block executions drop, and how far each method's output
lands from full computation at matched compute.

    python benchmarks/demo.py            # table on the bundled default
    python benchmarks/demo.py --steps 30 --tokens 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rfc_core import CacheConfig, RFCRun  # noqa: E402


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    angles = t[:, None] * 1000.0 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class AdaLNBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.modulation = nn.Linear(width, 6 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def modulated_input(self, x, vec):
        shift, scale = self.modulation(vec)[:, None].chunk(6, dim=-1)[:2]
        return self.norm(x) * (1 + scale) + shift

    def forward(self, x, vec):
        _, _, gate1, shift2, scale2, gate2 = self.modulation(vec)[:, None].chunk(6, dim=-1)
        h = self.modulated_input(x, vec)
        x = x + gate1 * self.attention(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(self.norm(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    def __init__(self, channels=8, width=96, depth=6, heads=4):
        super().__init__()
        self.embed = nn.Linear(channels, width)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, channels)

    def forward(self, x, sigma, run: RFCRun | None = None, counter: list | None = None):
        vec = self.time(timestep_embedding(sigma, 64))
        h = self.embed(x)
        for index, block in enumerate(self.blocks):
            module_input = block.modulated_input(h, vec) if run is not None else None
            predicted = run.predict("chunk", index, module_input) if run is not None else None
            if predicted is not None:
                h = h + predicted.view_as(h)
                continue
            out = block(h, vec)
            if counter is not None:
                counter[0] += 1
            if run is not None:
                run.record("chunk", index, module_input, (out - h).flatten(1))
            h = out
        return self.out(h)


@torch.no_grad()
def sample(model, noise, steps, config: CacheConfig | None):
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    run = RFCRun(config, first_module=0) if config is not None else None
    counter = [0]
    x = noise.clone()
    for i in range(steps):
        sigma = sigmas[i].repeat(x.shape[0])
        if run is not None:
            run.start_evaluation(float(sigmas[i]))
        velocity = model(x, sigma, run, counter)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    computed = run.computed_evaluations if run is not None else steps
    peak = 0
    if run is not None:
        run.finish()
        peak = run.peak_bytes
    return x, computed, counter[0], peak


def psnr(a, b):
    peak = b.abs().max()
    mse = (a - b).pow(2).mean()
    return (10 * torch.log10(peak**2 / mse)).item() if mse > 0 else float("inf")


METHODS = {
    "FORA (reuse + fixed)": dict(estimator="reuse", scheduler="fixed", order=0),
    "TaylorSeer (taylor m=2 + fixed)": dict(estimator="taylor", scheduler="fixed", order=2),
    "RFE (rfe m=2 + fixed)": dict(estimator="rfe", scheduler="fixed", order=2),
    "RFC (rfe m=2 + rcs)": dict(estimator="rfe", scheduler="rcs", order=2),
}


def matched_config(method: dict, steps: int, target_nfc: int, model, noise):
    """Fixed schedulers get the interval closest to the target; RCS gets the
    threshold whose run computes closest to the target (bisection)."""
    if method["scheduler"] == "fixed":
        interval = max(1, round(steps / target_nfc))
        return CacheConfig(interval=interval, max_skip=interval - 1 or 1, **method)
    low, high = 0.0, 10.0
    best = None
    for _ in range(18):
        threshold = (low + high) / 2
        config = CacheConfig(threshold=threshold, max_skip=50, **method)
        computed = sample(model, noise, steps, config)[1]
        if best is None or abs(computed - target_nfc) < abs(best[1] - target_nfc):
            best = (config, computed)
        if computed > target_nfc:
            low = threshold
        elif computed < target_nfc:
            high = threshold
        else:
            break
    return best[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--nfc", type=int, nargs="+", default=[25, 14, 10, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = TinyDiT().eval()
    noise = torch.randn(args.batch, args.tokens, 8)

    start = time.perf_counter()
    reference, _, full_blocks, _ = sample(model, noise, args.steps, None)
    full_time = time.perf_counter() - start

    print(f"TinyDiT ({len(model.blocks)} blocks), {args.steps} Euler steps, batch {args.batch}, "
          f"{args.tokens} tokens, random weights\n")
    print("| method | settings | NFC | block executions | PSNR vs full (dB) | rel. L2 | time vs full | cache peak |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| full compute | - | {args.steps} | {full_blocks} | inf | 0 | 1.00 | 0 |")
    for target in args.nfc:
        for name, method in METHODS.items():
            config = matched_config(method, args.steps, target, model, noise)
            start = time.perf_counter()
            latent, computed, blocks, peak = sample(model, noise, args.steps, config)
            elapsed = time.perf_counter() - start
            relative = ((latent - reference).norm() / reference.norm()).item()
            settings = (f"threshold {config.threshold:.3f}" if config.scheduler == "rcs"
                        else f"interval {config.interval}")
            print(f"| {name} | {settings} | {computed} | {blocks} | {psnr(latent, reference):.2f} | "
                  f"{relative:.4f} | {elapsed / full_time:.2f} | {peak / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
