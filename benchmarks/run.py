"""Benchmark: quality against compute for every caching method, on the two
bundled trained models, at matched numbers of full computations (NFC).

Each method's setting (interval for fixed schedules, threshold for RCS and
EasyCache's rule, Spectrum's first gap at each of its mix weights, gap
growths, windows, time variables and numbers of Chebyshev terms) is
searched so that it computes as close as possible to each target NFC out of
50 steps; quality is PSNR and SSIM of the decoded images against full
compute. Prints a markdown table per model, writes a plot of quality
against NFC and a side-by-side image grid per model.

    pip install pillow matplotlib
    python -m benchmarks.run                   # both models, under 10 minutes on 2 CPU cores
    python -m benchmarks.run --model nextdit   # one of them
    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.run   # the Flux model also through real ComfyUI

With COMFYUI_PATH set, the Flux comparison runs a second time through
ComfyUI's own Flux class, the pack's node function and ComfyUI's sampler,
with core's EasyCache node in place of the whole-model rule.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .methods import (METHODS, SPECTRUM_GROWTHS, SPECTRUM_MIXES, SPECTRUM_TERMS, SPECTRUM_TIMES, SPECTRUM_WINDOWS,
                      Method, SampleResult, SpectrumSetting, StandaloneSampler, rfc_core)
from .metrics import psnr, ssim
from .tiny_flux import latent_to_pixels, load_bundled

logger = logging.getLogger("benchmark")

DOCS = Path(__file__).resolve().parent.parent / "docs"
DEFAULT_TARGETS = (25, 14, 10, 8, 6)
# Threshold search range (log10) for RCS and EasyCache's rule.
LOG_THRESHOLD_RANGE = (-4.0, 1.0)


@dataclass
class Row:
    method: str
    target: int
    setting: float
    result: SampleResult
    psnr: float
    ssim: float
    time_ratio: float


def fixed_schedule_nfc(method: Method, interval: int, steps: int) -> int:
    """NFC of a fixed schedule, from the run's own decision logic on dummy features."""
    run = rfc_core().RFCRun(method.config(interval, 50), first_module=0)
    probe = torch.zeros(1, 1)
    for step in range(steps):
        run.start_evaluation(1.0 - step / steps)
        if run.predict("chunk", 0, probe) is None:
            run.record("chunk", 0, probe, probe)
    return run.computed_evaluations


def _closer(candidate_nfc: int, best_nfc: int | None, target: int) -> bool:
    """Closer to the target wins; on a tie the one computing more wins, so a
    baseline is never handicapped by the matching."""
    if best_nfc is None:
        return True
    a, b = abs(candidate_nfc - target), abs(best_nfc - target)
    return a < b or (a == b and candidate_nfc > best_nfc)


def bisect_nfc(nfc_of, low: float, high: float, iterations: int, target: int):
    """Bisect a setting in (low, high) whose NFC falls as it grows, for the
    one closest to the target (ties to more compute). nfc_of(middle) ->
    (setting, nfc, payload); returns the best of those."""
    best = None
    for _ in range(iterations):
        middle = (low + high) / 2
        found = nfc_of(middle)
        if _closer(found[1], None if best is None else best[1], target):
            best = found
        if found[1] == target:
            break
        if found[1] > target:
            low = middle
        else:
            high = middle
    return best


SPECTRUM = next(m for m in METHODS if m.scheduler == "spectrum")


def match_spectrum(sampler, target: int, reference: torch.Tensor) -> tuple[SpectrumSetting, SampleResult]:
    """Spectrum at each of its published mix weights, gap growths, windows,
    time variables and numbers of Chebyshev terms, the first gap searched to
    hit the target (from the schedule alone: its NFC does not depend on the
    features): the best image at the closest NFC wins, so the baseline gets
    its best setting at every budget."""
    candidates = []
    for growth in SPECTRUM_GROWTHS:
        def schedule_nfc(log_gap, growth=growth):
            setting = SpectrumSetting(math.exp(log_gap), growth, 1.0)
            return setting, len(setting.full_steps(sampler.steps)), None

        gap = bisect_nfc(schedule_nfc, 0.0, math.log(sampler.steps), 30, target)[0].first_gap
        for mix, window, time_variable, terms in itertools.product(SPECTRUM_MIXES, SPECTRUM_WINDOWS, SPECTRUM_TIMES,
                                                                   SPECTRUM_TERMS):
            setting = SpectrumSetting(gap, growth, mix, window, time_variable, terms)
            result = sampler.run(SPECTRUM, setting)
            quality = psnr(latent_to_pixels(result.latent), reference)
            # Closest NFC first, then more compute (as _closer), then the better image.
            candidates.append(((abs(result.nfc - target), -result.nfc, -quality), setting, result))
    _, setting, result = min(candidates, key=lambda candidate: candidate[0])
    return setting, result


def match(sampler, method: Method, target: int, max_skip: int, memo: dict,
          reference: torch.Tensor | None = None) -> tuple[float, SampleResult]:
    """reference: full compute's pixels, which Spectrum's search picks its best setting by."""
    steps = sampler.steps
    if method.scheduler == "spectrum":
        return match_spectrum(sampler, target, reference)
    if not method.searches_threshold:
        best = None
        for interval in range(1, steps + 1):
            nfc = fixed_schedule_nfc(method, interval, steps)
            if _closer(nfc, None if best is None else best[1], target):
                best = (interval, nfc)
        return best[0], sampler.run(method, best[0])

    def evaluate(threshold: float) -> SampleResult:
        key = (method, round(threshold, 12))
        if key not in memo:
            memo[key] = sampler.run(method, threshold, max_skip)
        return memo[key]

    def threshold_nfc(log_threshold):
        result = evaluate(10 ** log_threshold)
        return 10 ** log_threshold, result.nfc, result

    threshold, _, result = bisect_nfc(threshold_nfc, *LOG_THRESHOLD_RANGE, 14, target)
    return threshold, result


def benchmark(sampler, methods, targets, max_skip: int, label: str) -> tuple[list[Row], torch.Tensor, dict]:
    full_times = []
    reference = None
    for _ in range(3):
        full = sampler.run(None)
        full_times.append(full.seconds)
        reference = full.latent
    full_seconds = statistics.median(full_times)
    reference_pixels = latent_to_pixels(reference)
    rows, images, failures = [], {}, []
    memo: dict = {}
    cells, started_all = len(methods) * len(targets), time.perf_counter()
    for method_index, method in enumerate(methods):
        for target_index, target in enumerate(targets):
            started = time.perf_counter()
            try:
                setting, result = match(sampler, method, target, max_skip, memo, reference_pixels)
            except RuntimeError as error:
                # A baseline that crashes is a result too (core's EasyCache
                # node fails on batched cond/uncond at some ComfyUI versions).
                logger.warning("%s: %s failed: %s", label, method.name, error)
                failures.append(f"| {method.name} | {target} | failed: {str(error).splitlines()[0][:120]} |"
                                " | | | | |")
                break
            pixels = latent_to_pixels(result.latent)
            rows.append(Row(method.name, target, setting, result, psnr(pixels, reference_pixels),
                            ssim(pixels, reference_pixels), result.seconds / full_seconds))
            images[(method.name, target)] = pixels
            done = method_index * len(targets) + target_index + 1
            elapsed = time.perf_counter() - started_all
            logger.info("[%s %d/%d] %s at NFC %d (target %d): searched in %.1fs; %s so far, about %s left", label,
                        done, cells, method.name, result.nfc, target, time.perf_counter() - started,
                        minutes(elapsed), minutes(elapsed / done * (cells - done)))
    return rows, reference_pixels, images, failures


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def describe_setting(setting) -> str:
    if isinstance(setting, SpectrumSetting):
        window = "all" if setting.window is None else f"last {setting.window}"
        return (f"gap {setting.first_gap:.3g}, growth {setting.growth:g}, w {setting.mix:g}, window {window}, "
                f"time {setting.time}, T0-T{setting.terms - 1}")
    return f"interval {setting}" if isinstance(setting, int) else f"threshold {setting:.4g}"


def markdown_table(rows: list[Row], steps: int, title: str, failures: list[str] = ()) -> str:
    lines = [f"### {title}", "",
             "| method | target NFC | NFC | setting | PSNR (dB) | SSIM | time vs full | cache memory |",
             "|---|---|---|---|---|---|---|---|",
             f"| full compute | {steps} | {steps} | - | inf | 1.000 | 1.00 | 0 |"]
    for row in rows:
        setting = describe_setting(row.setting)
        memory = "-" if row.result.cache_bytes is None else f"{row.result.cache_bytes / 2**20:.2f} MiB"
        lines.append(f"| {row.method} | {row.target} | {row.result.nfc} | {setting} | {row.psnr:.2f} | "
                     f"{row.ssim:.3f} | {row.time_ratio:.2f} | {memory} |")
    return "\n".join(lines + list(failures))


def plot(rows: list[Row], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(row.method for row in rows):
        mine = sorted((r for r in rows if r.method == name), key=lambda r: r.result.nfc)
        style = dict(linewidth=2.5) if name.startswith("RFC") else dict(linewidth=1.2)
        for axis, metric in zip(axes, ("psnr", "ssim")):
            axis.plot([r.result.nfc for r in mine], [getattr(r, metric) for r in mine], marker="o", label=name,
                      **style)
    axes[0].set_ylabel("PSNR vs full compute (dB)")
    axes[1].set_ylabel("SSIM vs full compute")
    for axis in axes:
        axis.set_xlabel("full computations (NFC) of 50 steps")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def image_grid(reference: torch.Tensor, images: dict, methods, target: int, path: Path, count: int = 8):
    """Columns: full compute, then each method at the target NFC; rows: samples."""
    from PIL import Image

    columns = [reference[:count]] + [images[(m.name, target)][:count] for m in methods]
    pad = 2
    tiles = [torch.nn.functional.pad(torch.stack(list(col)), (pad, pad, pad, pad), value=1.0) for col in columns]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in tiles], dim=2)
    array = grid.permute(1, 2, 0).mul(255).round().byte().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((array.shape[1] * 3, array.shape[0] * 3), Image.NEAREST).save(path)
    return path


def sample_set(count: int, classes: int) -> tuple[torch.Tensor, list[int]]:
    """The fixed benchmark set: labels cycle through the classes, seed i for sample i."""
    return torch.arange(count) % classes, list(range(count))


def bundled_models() -> dict:
    """--model name: (loader, file name stem, plot title)."""
    from .tiny_nextdit import load_bundled_nextdit

    return {"flux": (load_bundled, "flux", "bundled tiny Flux"),
            "nextdit": (load_bundled_nextdit, "nextdit", "bundled tiny NextDiT (Lumina 2 / Z-Image layout)")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["all", "flux", "nextdit"], default="all",
                        help="which bundled model to run (default: both)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--nfc", type=int, nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--max-skip", type=int, default=50,
                        help="max_skip for the threshold-driven methods (the fixed ones skip interval-1)")
    parser.add_argument("--methods", nargs="+", help="substrings of method names to run (default: all)")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--no-host", action="store_true", help="skip the ComfyUI pass even with COMFYUI_PATH set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    methods = [m for m in METHODS if not args.methods or any(s.lower() in m.name.lower() for s in args.methods)]
    grid_target = min(args.nfc, key=lambda n: abs(n - 10))
    models = bundled_models()
    for key in (models if args.model == "all" else [args.model]):
        torch.manual_seed(0)
        load, stem, name = models[key]
        model, encoder, _ = load()
        labels, seeds = sample_set(args.samples, len(encoder.names))
        sampler = StandaloneSampler(model, encoder, labels, seeds, args.steps, args.cfg)
        rows, reference, images, failures = benchmark(sampler, methods, args.nfc, args.max_skip, key)
        title = (f"{name[0].upper()}{name[1:]}, {args.samples} samples, {args.steps} Euler steps, cfg {args.cfg}, "
                 f"{torch.get_num_threads()} CPU threads")
        print(markdown_table(rows, args.steps, title, failures))
        print()
        plot(rows, args.out / f"benchmark_{stem}_quality_vs_nfc.png", f"Quality against full compute, {name}")
        image_grid(reference, images, methods, grid_target, args.out / f"benchmark_{stem}_grid_nfc{grid_target}.png")
        comfyui_path = os.environ.get("COMFYUI_PATH")
        if key == "flux" and comfyui_path and not args.no_host:
            from .host import HostSampler, host_methods

            host_sampler = HostSampler(comfyui_path, labels, seeds, args.steps, args.cfg)
            host_rows, _, _, host_failures = benchmark(host_sampler, host_methods(methods), args.nfc, args.max_skip,
                                                       "ComfyUI")
            print(markdown_table(host_rows, args.steps, f"Through ComfyUI ({host_sampler.version}): {title}",
                                 host_failures))
            print()
    print(f"Total time: {minutes(time.perf_counter() - started)}")


if __name__ == "__main__":
    main()
