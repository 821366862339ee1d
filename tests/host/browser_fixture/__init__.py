"""Test-only nodes for the browser test: the bundled tiny Flux as a MODEL,
and its label conditionings and an empty latent, so that a real ComfyUI
server can run an RFC workflow without any downloaded model."""

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.host import comfy_flux_from_bundled  # noqa: E402
from benchmarks.tiny_flux import load_bundled  # noqa: E402


class TinyFluxLoader:
    CATEGORY = "RFC tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (comfy_flux_from_bundled(),)


class TinyFluxPrompt:
    CATEGORY = "RFC tests"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("INT", {"default": 0, "min": 0, "max": 15})}}

    def encode(self, label):
        model, encoder, _ = load_bundled()
        tokens, pooled = encoder(torch.tensor([label]))
        empty_tokens, empty_pooled = encoder(torch.tensor([encoder.empty]))
        # Not all zeros: KSampler widens an all-zero latent to the latent
        # format's 16 channels, and the tiny model takes 12.
        latent = torch.full((1, model.config["in_channels"], 16, 16), 1e-6)
        return ([[tokens, {"pooled_output": pooled}]], [[empty_tokens, {"pooled_output": empty_pooled}]],
                {"samples": latent})


NODE_CLASS_MAPPINGS = {"RFCTestTinyFluxLoader": TinyFluxLoader, "RFCTestTinyFluxPrompt": TinyFluxPrompt}
