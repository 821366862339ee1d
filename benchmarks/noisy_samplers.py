"""Samplers that add fresh noise to the latent at every step (euler_ancestral,
dpmpp_2m_sde, lcm) against deterministic euler, on both bundled models run
through ComfyUI's own sampler and the pack's node. For each: the plain run,
RFC at its defaults and RFC with target_speedup 2 and 3, with the model
evaluations computed, the median forecast error RCS read, and PSNR against
the plain run with the same sampler and seed; next to them the same sampler
with a half and a third of the steps, what a user could do instead.

    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.noisy_samplers   # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter

import torch

from .host import boot_comfyui, comfy_flux_from_bundled, comfy_nextdit_from_bundled
from .methods import seeded_noise
from .metrics import psnr
from .run import sample_set
from .tiny_flux import latent_to_pixels, load_bundled
from .tiny_nextdit import load_bundled_nextdit

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m_sde", "lcm")
# "defaults" is the node as a user drags it in: on a noise-adding sampler other
# than lcm, runs over 10 steps use target_speedup 2 (nodes.runtime).

SETTINGS = (("defaults", {}), ("target 2", {"target_speedup": 2.0}), ("target 3", {"target_speedup": 3.0}))


def bundled(name: str, nodes, count: int):
    """(model patcher, positive, negative, noise) for one bundled model."""
    if name == "flux":
        model = comfy_flux_from_bundled()
        _, encoder, _ = load_bundled()
        labels, seeds = sample_set(count, len(encoder.names))
        tokens, pooled = encoder(labels)
        empty_tokens, empty_pooled = encoder(torch.full_like(labels, encoder.empty))
        positive = [[tokens, {"pooled_output": pooled}]]
        negative = [[empty_tokens, {"pooled_output": empty_pooled}]]
        channels = model.model.diffusion_model.params.in_channels
    else:
        model = comfy_nextdit_from_bundled()
        # The bundled NextDiT was trained on Z-Image's shift-3 schedule.
        model = nodes.NODE_CLASS_MAPPINGS["ModelSamplingAuraFlow"]().patch_aura(model, 3.0)[0]
        _, encoder, _ = load_bundled_nextdit()
        labels, seeds = sample_set(count, len(encoder.names))
        tokens, _ = encoder(labels)
        empty_tokens, _ = encoder(torch.full_like(labels, encoder.empty))

        def conditioning(t):
            return [[t, {"attention_mask": torch.ones(t.shape[:2], dtype=torch.long)}]]

        positive, negative = conditioning(tokens), conditioning(empty_tokens)
        channels = model.model.diffusion_model.in_channels
    return model, positive, negative, seeded_noise(seeds, channels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", choices=("flux", "nextdit"), nargs="+", default=["flux", "nextdit"])
    parser.add_argument("--sampler", nargs="+", default=list(SAMPLERS))
    args = parser.parse_args(argv)
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout whose requirements this Python has")
    nodes = boot_comfyui(comfyui)
    import comfy.sample

    runtime = sys.modules[nodes.NODE_CLASS_MAPPINGS["RFCCache"].__module__.rsplit(".", 1)[0] + ".runtime"]
    finished = []
    finish = runtime.SamplingSession.finish

    def keep(session):
        finished.append(session.run)
        return finish(session)

    runtime.SamplingSession.finish = keep
    print("| model | sampler | steps | setting | computed | median forecast error | PSNR vs plain (dB) | why |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.model:
        model, positive, negative, noise = bundled(name, nodes, args.samples)
        latent_format = model.model.latent_format
        for sampler in args.sampler:
            for steps in args.steps:
                def sample_steps(patched, count):
                    with torch.no_grad():
                        latent = comfy.sample.sample(patched, noise, count, 3.0, sampler, "simple", positive, negative,
                                                     torch.zeros_like(noise), seed=0, disable_pbar=True)
                    return latent_to_pixels(latent_format.process_in(latent))

                def sample(patched):
                    return sample_steps(patched, steps)

                plain = sample(model)
                # What a user could do instead: fewer steps of the same sampler.
                for divisor in (2, 3):
                    fewer = sample_steps(model, steps // divisor)
                    print(f"| {name} | {sampler} | {steps} | plain, {steps // divisor} steps | "
                          f"{steps // divisor} of {steps // divisor} | - | {psnr(fewer, plain):.2f} | - |", flush=True)
                for label, widgets in SETTINGS:
                    finished.clear()
                    pixels = sample(nodes.NODE_CLASS_MAPPINGS["RFCCache"]().apply(model, **widgets)[0])
                    run = finished[-1]
                    errors = [e.forecast_error for e in run.evaluations if e.forecast_error is not None]
                    error = f"{statistics.median(errors):.3f}" if errors else "-"
                    quality = psnr(pixels, plain)
                    why = Counter(e.reason for e in run.evaluations[1:] if e.counts_as_computed).most_common(1)
                    print(f"| {name} | {sampler} | {steps} | {label} | {run.computed_evaluations} of "
                          f"{len(run.evaluations)} | {error} | "
                          f"{'identical' if quality >= 100 else f'{quality:.2f}'} | "
                          f"{why[0][0] if why else '-'} |", flush=True)


if __name__ == "__main__":
    main()
