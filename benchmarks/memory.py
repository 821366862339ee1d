"""Benchmark: what RFC's cache costs in memory, and what quality each layout keeps.

Two tables (issue 30):

1. At the sizes the official templates run: the bytes of every layout
   (per block, spans; the model's dtype or int8; device or system memory),
   from the projection the pack makes before it allocates
   (rfc_core.memory.Footprint, checked against what a run then allocates by
   tests/core/test_memory_plan.py), and what the automatic plan picks on a
   12, 16, 24 and 32 GB GPU with 32 or 64 GB of RAM. The shapes and what
   else the machine holds are stated per model (MODELS, machine_budget).
2. On the bundled models: PSNR against full compute at NFC 25, 14, 10, 8
   and 6 for each layout and for the O(1)-memory peers, against
   memory_fraction, the cache's bytes as a share of the per-block bf16
   cache's (1 for RFC as published), and what the same layout's share is at
   FLUX.1 dev's size (on the bundled models the first block's input and
   the blocks' inputs, a 256 x 256 sample at full size, are as large as a
   residual, so the share there overstates what a layout costs at full
   size). Each threshold is searched to hit the budget as in benchmarks.run.

    python -m benchmarks.memory                      # both tables, both bundled models
    python -m benchmarks.memory --sizes-only         # the first table alone (seconds)
    python -m benchmarks.memory --json rows.json     # also {model, setting, memory_fraction, nfc, psnr} rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .methods import METHODS, Method, StandaloneSampler, rfc_core
from .run import DEFAULT_TARGETS, benchmark, bundled_models, minutes, sample_set

GB = 1e9


@dataclass(frozen=True)
class TemplateModel:
    """A template's run, as its cache sees it (bf16 features)."""
    name: str
    group_blocks: tuple[int, ...]
    image_tokens: int
    text_tokens: int
    width: int
    samples: int  # cond and uncond: 2 where the template runs cfg above 1
    weights_gb: float  # the template's diffusion model file (fp8 or bf16) on the GPU
    others_gb: float  # text encoder and VAE, kept in system memory between uses


MODELS = (
    # 19 double + 38 single blocks, 3072 wide; guidance-distilled, cfg 1; fp8 file.
    TemplateModel("FLUX.1 dev, 1024x1024", (19, 38), 4608, 512, 3072, 1, 11.9, 9.8),
    # 8 double + 48 single blocks, 6144 wide, patch 1 on a 128-channel latent; fp8 file.
    TemplateModel("FLUX.2 dev, 1024x1024", (8, 48), 4096, 512, 6144, 1, 35.5, 18.0),
    # 60 blocks, 3072 wide, cfg 4; fp8 file.
    TemplateModel("Qwen-Image, 1328x1328, cfg 4", (60,), 6889, 256, 3072, 2, 20.4, 9.4),
    # 2 noise refiners + 30 layers, 3840 wide; 8 steps, cfg 1; bf16 file.
    TemplateModel("Z-Image Turbo, 1024x1024", (2, 30), 4096, 256, 3840, 1, 12.3, 8.0),
    # 40 blocks, 5120 wide; 81 frames: 21 latent frames; cfg 3.5 (no speed LoRA); fp8 file.
    TemplateModel("Wan 2.2 14B, 832x480, 81 frames, cfg", (40,), 32760, 0, 5120, 2, 14.3, 6.7),
    TemplateModel("Wan 2.2 14B, 1280x720, 81 frames, cfg", (40,), 75600, 0, 5120, 2, 14.3, 6.7),
    # 48 blocks; video 4096 wide (16 x 23 x 40 latent tokens), audio 2048 wide (~121 tokens: as 61 at 4096); fp8.
    TemplateModel("LTX-2.3, 1280x720, 121 frames", (48,), 14720, 61, 4096, 1, 27.0, 12.0),
    # 54 blocks, 2048 wide; 31 latent frames at 45 x 80; cfg 6; fp8 file.
    TemplateModel("HunyuanVideo 1.5, 1280x720, 121 frames, cfg", (54,), 111600, 256, 2048, 2, 8.3, 8.0),
)
GPUS_GB = (12, 16, 24, 32)
RAMS_GB = (32, 64)
# A step's activations, as a number of one chunk's residuals: attention's
# Q, K and V and its output, and the MLP's hidden state at 4x the width.
ACTIVATION_RESIDUALS = 8
# What ComfyUI keeps free on the GPU (EXTRA_RESERVED_VRAM, Linux).
RESERVED_GB = 0.4


def footprint_of(model: TemplateModel, chunk_samples: int):
    memory = rfc_core().memory
    features = (model.image_tokens + model.text_tokens) * model.width
    return memory.Footprint(model.group_blocks, features, model.image_tokens * model.width, 256 * 256, 2,
                            model.samples, 2, chunk_samples)


def chunk_samples_on(model: TemplateModel, gpu_gb: float) -> int:
    """ComfyUI batches cond and uncond into one chunk only where both fit
    beside the weights; otherwise it runs them one at a time."""
    step_one = ACTIVATION_RESIDUALS * (model.image_tokens + model.text_tokens) * model.width * 2 / GB
    fits = model.weights_gb + model.samples * step_one + RESERVED_GB <= gpu_gb
    return model.samples if fits else 1


def machine_budget(model: TemplateModel, gpu_gb: float, ram_gb: float, chunk_samples: int):
    """What the plan would read on such a machine at the first block: the GPU
    less the weights that fit on it, the step's activations and ComfyUI's
    reserve; the RAM less the weights that did not fit, the text encoder and
    VAE, and the plan's own margin (nodes.runtime.memory)."""
    memory = rfc_core().memory
    residual = (model.image_tokens + model.text_tokens) * model.width * 2 * chunk_samples
    step = ACTIVATION_RESIDUALS * residual / GB
    on_gpu = min(model.weights_gb, gpu_gb - step - RESERVED_GB)
    device = max(0.0, gpu_gb - on_gpu - step - RESERVED_GB)
    margin = max(2.0 * 2 ** 30 / GB, 0.1 * ram_gb)
    system = max(0.0, ram_gb - margin - (model.weights_gb - max(on_gpu, 0.0)) - model.others_gb)
    return memory.Budget(device=int(device * GB), system=int(system * GB))


def size_table() -> str:
    memory = rfc_core().memory
    layouts = [memory.Layout(), memory.Layout(int8=True), memory.Layout(span=2), memory.Layout(span=2, int8=True),
               memory.Layout(span=4, int8=True)]
    lines = ["| model | " + " | ".join(layout_name(layout) for layout in layouts) + " |",
             "|---|" + "---|" * len(layouts)]
    for model in MODELS:
        footprint = footprint_of(model, model.samples)
        lines.append(f"| {model.name} | " + " | ".join(f"{footprint.total(l) / GB:.1f}" for l in layouts) + " |")
    lines += ["", "What the automatic plan picks (GB on GPU / GB in RAM). Where the GPU is short, ComfyUI runs "
              "cond and uncond as two chunks, which the working tensors follow:", ""]
    machines = [(gpu, ram) for ram in RAMS_GB for gpu in GPUS_GB]
    lines += ["| model | " + " | ".join(f"{gpu} GB GPU, {ram} GB RAM" for gpu, ram in machines) + " |",
              "|---|" + "---|" * len(machines)]
    for model in MODELS:
        cells = []
        for gpu, ram in machines:
            chunk_samples = chunk_samples_on(model, gpu)
            footprint = footprint_of(model, chunk_samples)
            layout = memory.choose_layout(footprint, machine_budget(model, gpu, ram, chunk_samples))
            cells.append("whole model" if layout is None else
                         f"{layout_name(layout)}: {footprint.on_device(layout) / GB:.1f} / "
                         f"{footprint.on_system(layout) / GB:.1f}")
        lines.append(f"| {model.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layout_name(layout) -> str:
    unit = "per block" if layout.span == 1 else f"span {layout.span}"
    return f"{unit}, {'int8' if layout.int8 else 'bf16'}" + (", RAM" if layout.system else "")


# The layouts measured on the bundled models, and the O(1)-memory peers.
RFC = next(m for m in METHODS if m.name == "RFC m=1 (RFE + RCS)")
LAYOUT_METHODS = (
    RFC,
    dataclasses.replace(RFC, name="RFC m=1, int8", cache_dtype="int8"),
    dataclasses.replace(RFC, name="RFC m=1, spans of 2", cache_span=2),
    dataclasses.replace(RFC, name="RFC m=1, spans of 2, int8", cache_dtype="int8", cache_span=2),
    dataclasses.replace(RFC, name="RFC m=1, spans of 3, int8", cache_dtype="int8", cache_span=3),
    dataclasses.replace(RFC, name="RFC m=1, spans of 6, int8", cache_dtype="int8", cache_span=6),
)
PEERS = tuple(m for m in METHODS if m.granularity == "model" or m.scheduler in ("easycache", "spectrum"))


def memory_fraction(result, per_block_bf16: int) -> float:
    """The cache's bytes in bf16 terms over the per-block bf16 cache's: from
    the plan's projection for RFC's layouts, from the measured peak (a
    float32 model's, halved) for the others."""
    if result.footprint is not None:
        return dataclasses.replace(result.footprint, element_size=2).total(result.layout) / per_block_bf16
    return result.cache_bytes / 2 / per_block_bf16


def quality_table(key: str, samples: int, targets, max_skip: int) -> list[dict]:
    load, _, name = bundled_models()[key]
    torch.manual_seed(0)
    model, encoder, _ = load()
    labels, seeds = sample_set(samples, len(encoder.names))
    sampler = StandaloneSampler(model, encoder, labels, seeds, 50, 3.0)
    rows, _, _, failures = benchmark(sampler, LAYOUT_METHODS + PEERS, targets, max_skip, key)
    per_block = next(r for r in rows if r.method == RFC.name).result
    per_block_bf16 = dataclasses.replace(per_block.footprint, element_size=2).total(per_block.layout)
    table = []
    print(f"\n{name}, {samples} samples, 50 Euler steps, cfg 3 (PSNR dB against full compute)\n")
    flux_dev = footprint_of(MODELS[0], MODELS[0].samples)
    print("| setting | memory_fraction | the layout at FLUX.1 dev size | " + " | ".join(f"NFC {t}" for t in targets)
          + " |")
    print("|---|---|---|" + "---|" * len(targets))
    for method in LAYOUT_METHODS + PEERS:
        cells = {r.target: r for r in rows if r.method == method.name}
        if not cells:
            continue
        fraction = max(memory_fraction(r.result, per_block_bf16) for r in cells.values())
        layout = next(iter(cells.values())).result.layout
        at_dev = "-" if layout is None else f"{flux_dev.total(layout) / flux_dev.total(type(layout)()):.3f}"
        print(f"| {method.name} | {fraction:.3f} | {at_dev} | " + " | ".join(
            f"{cells[t].psnr:.2f} ({cells[t].result.nfc})" if t in cells else "-" for t in targets) + " |")
        table += [{"model": key, "setting": method.name, "memory_fraction": round(fraction, 4),
                   "nfc": r.result.nfc, "psnr": round(r.psnr, 3)} for r in cells.values()]
    for failure in failures:
        print(failure)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["all", "flux", "nextdit"], default="all")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--nfc", type=int, nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--max-skip", type=int, default=50)
    parser.add_argument("--sizes-only", action="store_true", help="only the table at template sizes")
    parser.add_argument("--json", type=Path, help="write the bundled models' rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    print("Cache size at template sizes, GB (bf16 features, order 1: two slots per unit):\n")
    print(size_table())
    if args.sizes_only:
        return
    rows = []
    for key in (bundled_models() if args.model == "all" else [args.model]):
        rows += quality_table(key, args.samples, args.nfc, args.max_skip)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nTotal time: {minutes(time.perf_counter() - started)}")


if __name__ == "__main__":
    main()
