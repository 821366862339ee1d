"""Tiny random-weight models built from ComfyUI's own config classes, and a
way to count real block executions from outside the pack."""

from __future__ import annotations

import torch

from benchmarks.host import BlockCounter as HookCounter
from benchmarks.host import complete_params


def comfyui_version() -> str:
    import comfyui_version as version_module

    return f"ComfyUI {version_module.__version__}"

FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}

CHROMA_CONFIG = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
    "hidden_dim": 32, "n_layers": 2,
}


def build(config_class_name: str, unet_config: dict, seed: int = 0, overrides: dict | None = None,
          checkpoint=None, dtypes=(torch.float32, None)):
    """A tiny random-weight model of `comfy.supported_models.<config_class_name>`.
    overrides: set on the config after it is made, for families whose config
    class forces full-size values over the ones given (JoyImage's rope axes).
    checkpoint(): weights the model loads while it is built (Stable Audio 3's
    seconds embedder), called once the class is known to exist.
    dtypes: (weight dtype, ComfyUI's manual cast dtype or None), as
    `set_inference_dtype` takes them: (float16, float32) stores the weights
    in half precision and computes in float32."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if not hasattr(comfy.supported_models, config_class_name):
        import pytest

        pytest.skip(f"{config_class_name}: not in this ComfyUI ({comfyui_version()})")
    model_config = getattr(comfy.supported_models, config_class_name)(complete_params(unet_config))
    model_config.unet_config.update(overrides or {})
    model_config.set_inference_dtype(*dtypes)
    model = model_config.get_model(checkpoint() if checkpoint is not None else {})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


class BlockCounter(HookCounter):
    """Counts real executions of every transformer block of a model."""

    def __init__(self, diffusion_model, attributes=("double_blocks", "single_blocks")):
        super().__init__([block for attribute in attributes for block in getattr(diffusion_model, attribute)])


def conditioning(batch: int, tokens: int = 8, width: int = 32, pooled: int = 32, seed: int = 1, guidance=3.5):
    generator = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, tokens, width, generator=generator)
    extras = {"pooled_output": torch.randn(batch, pooled, generator=generator)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[cross, extras]]


def sample(model_patcher, steps=12, cfg=1.0, batch=1, seed=0, size=16, sampler="euler", scheduler="simple"):
    import comfy.sample

    latent = torch.zeros(batch, 16, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive = conditioning(batch, seed=1)
    negative = conditioning(batch, seed=2)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def counted(modules, sample_fn):
    """Run `sample_fn` and count the forwards of `modules` it caused."""
    counter = HookCounter(modules)
    try:
        latent = sample_fn()
    finally:
        counter.close()
    return latent, counter.calls
