"""Train the bundled benchmark models: a small Flux and a small NextDiT
(Lumina 2 / Z-Image layout), flow matching on scikit-image's bundled
photographs and LFW crops, class-conditioned.

Caching methods have to be compared on models whose features change from
step to step the way a trained model's do; random weights do not. This
script makes each model reproducibly (fixed seed, fixed step count) in at
most about 30 minutes on 2 CPU cores:

    pip install scikit-image pillow
    python -m benchmarks.train_tiny_models --model flux      # train, save, draw the sample grid
    python -m benchmarks.train_tiny_models --model nextdit
    python -m benchmarks.train_tiny_models --model nextdit --grid-only  # redraw the grid from the saved weights
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .tiny_flux import (BUNDLED_WEIGHTS, LABEL_POOLED_KEY, LABEL_TOKENS_KEY, TinyFlux, flux_sigmas,
                        latent_to_pixels, load_bundled, pixels_to_latent)
from .tiny_nextdit import BUNDLED_NEXTDIT_WEIGHTS, TinyNextDiT, load_bundled_nextdit, shifted_flow_sigmas

logger = logging.getLogger("train_tiny_models")

FLUX_CONFIG = {
    "in_channels": 12, "out_channels": 12, "vec_in_dim": 64, "context_in_dim": 64, "hidden_size": 128,
    "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False,
}
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "colorwheel", "horse", "hubble_deep_field",
          "immunohistochemistry", "logo", "moon", "retina", "rocket", "clock")
CLASS_NAMES = list(PHOTOS) + ["lfw_face", "lfw_non_face"]
IMAGE_SIZE = 32
LABEL_TOKENS = 4
DOCS = Path(__file__).resolve().parent.parent / "docs"
# ComfyUI's NextDiT constructor keys, in Lumina 2's layout (the one every
# supported ComfyUI has; Z-Image's modulation needs dim >= 256) at the Flux
# model's width, with six joint layers where Flux has 2 + 4 blocks.
NEXTDIT_CONFIG = {
    "patch_size": 2, "in_channels": 12, "dim": 128, "n_layers": 6, "n_refiner_layers": 1, "n_heads": 4,
    "n_kv_heads": 4, "multiple_of": 32, "ffn_dim_multiplier": 4.0, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 64, "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32], "rope_theta": 10000.0,
    "z_image_modulation": False, "time_scale": 1.0,
}


@dataclass(frozen=True)
class Recipe:
    """What differs between the bundled models."""

    config: dict
    config_key: str  # the safetensors metadata key of the config
    build: Callable
    # (model, noisy latent, sigma, label tokens, label pooled vectors) -> velocity
    call: Callable
    weights: Path
    load: Callable
    sigmas: Callable
    grid: Path
    pooled: bool  # whether the label encoder has a pooled vector
    label_width: int  # width of the label tokens (and pooled vector): the model's text input
    steps: int  # training steps at batch 96: each model trains in under 30 minutes on 2 CPU cores


RECIPES = {
    "flux": Recipe(FLUX_CONFIG, "flux_config", TinyFlux, lambda m, x, s, t, p: m(x, s, t, p), BUNDLED_WEIGHTS,
                   load_bundled, flux_sigmas, DOCS / "tiny_flux_samples.png", True,
                   FLUX_CONFIG["context_in_dim"], 2000),
    "nextdit": Recipe(NEXTDIT_CONFIG, "nextdit_config", TinyNextDiT, lambda m, x, s, t, p: m(x, s, t),
                      BUNDLED_NEXTDIT_WEIGHTS, load_bundled_nextdit, shifted_flow_sigmas,
                      DOCS / "tiny_nextdit_samples.png", False,
                      NEXTDIT_CONFIG["cap_feat_dim"], 1600),
}


def _to_rgb_tensor(image) -> torch.Tensor:
    """Any skimage image to (3, H, W) float in [-1, 1]."""
    import numpy as np

    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1 - alpha)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2 - 1


def _resize_short_side(image: torch.Tensor, short: int) -> torch.Tensor:
    _, h, w = image.shape
    scale = short / min(h, w)
    size = (max(short, round(h * scale)), max(short, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="area")[0]


class SkimageDataset:
    """Random crops and flips of the photographs (one class each) and of the
    LFW subset (faces, non-faces), made on the fly at 32x32."""

    def __init__(self, generator: torch.Generator):
        import skimage.data

        self.generator = generator
        self.photos = [_resize_short_side(_to_rgb_tensor(getattr(skimage.data, name)()), 40) for name in PHOTOS]
        lfw = torch.from_numpy(skimage.data.lfw_subset()).float()
        lfw = F.interpolate(lfw[:, None], size=(36, 36), mode="bilinear", align_corners=False)
        lfw = lfw.expand(-1, 3, -1, -1) * 2 - 1
        # skimage documents the first 100 as faces and the last 100 as not.
        self.faces, self.non_faces = lfw[:100], lfw[100:]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _crop(self, image: torch.Tensor, size: int) -> torch.Tensor:
        _, h, w = image.shape
        top, left = self._randint(h - size + 1), self._randint(w - size + 1)
        crop = image[:, top:top + size, left:left + size]
        if size != IMAGE_SIZE:
            crop = F.interpolate(crop[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0]
        if self._randint(2):
            crop = crop.flip(-1)
        return crop

    def sample(self, label: int) -> torch.Tensor:
        if label < len(self.photos):
            image = self.photos[label]
            return self._crop(image, 32 + self._randint(min(image.shape[1:]) - 32 + 1))
        pool = self.faces if label == len(self.photos) else self.non_faces
        return self._crop(pool[self._randint(len(pool))], IMAGE_SIZE)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(CLASS_NAMES), (size,), generator=self.generator)
        return torch.stack([self.sample(int(label)) for label in labels]), labels


class LabelEmbedding(nn.Module):
    def __init__(self, classes: int, width: int):
        super().__init__()
        # One extra row: the dropped ("empty") label used for guidance.
        self.tokens = nn.Parameter(torch.randn(classes + 1, LABEL_TOKENS, width) * 0.5)
        self.pooled = nn.Parameter(torch.randn(classes + 1, width) * 0.5)


def train(recipe: Recipe, args) -> None:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = SkimageDataset(generator)
    model = recipe.build(recipe.config)
    labels = LabelEmbedding(len(CLASS_NAMES), recipe.label_width)
    parameters = list(model.parameters()) + list(labels.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    ema_model, ema_labels = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(labels).requires_grad_(False)
    empty = len(CLASS_NAMES)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, label = data.batch(args.batch)
        label = torch.where(torch.rand(args.batch, generator=generator) < args.label_dropout,
                            torch.full_like(label, empty), label)
        clean = pixels_to_latent(images)
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=generator))
        noisy = (1 - sigma[:, None, None, None]) * clean + sigma[:, None, None, None] * noise
        prediction = recipe.call(model, noisy, sigma, labels.tokens[label], labels.pooled[label])
        loss = F.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(list(ema_model.parameters()) + list(ema_labels.parameters()), parameters):
                ema_p.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == 1:
            logger.info("step %d/%d loss %.4f lr %.2e %.0fs", step, args.steps, loss.item(), lr,
                        time.perf_counter() - start)
    save(recipe, ema_model, ema_labels, args, time.perf_counter() - start)


def save(recipe: Recipe, model: nn.Module, labels: LabelEmbedding, args, seconds: float) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state[LABEL_TOKENS_KEY] = labels.tokens.detach().to(torch.float16).contiguous()
    if recipe.pooled:
        state[LABEL_POOLED_KEY] = labels.pooled.detach().to(torch.float16).contiguous()
    metadata = {
        recipe.config_key: json.dumps(recipe.config),
        "labels": json.dumps(CLASS_NAMES),
        "training": json.dumps({"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                                "label_dropout": args.label_dropout, "ema": args.ema,
                                "seconds": round(seconds)}),
        "latent": "pixel_unshuffle(rgb in [-1, 1], 2): 12 channels at half resolution",
    }
    recipe.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(recipe.weights), metadata=metadata)
    logger.info("saved %s (%.1f MB)", recipe.weights, recipe.weights.stat().st_size / 1e6)


@torch.no_grad()
def sample_grid(recipe: Recipe, steps: int = 40, cfg: float = 3.0, per_class: int = 6) -> Path:
    """Rows: classes; columns: seeds; the last column is a real training crop."""
    from PIL import Image

    model, encoder, _ = recipe.load()
    classes = len(encoder.names)
    label = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(label), recipe.config["in_channels"], IMAGE_SIZE // 2, IMAGE_SIZE // 2,
                        generator=torch.Generator().manual_seed(1234))
    sigmas = recipe.sigmas(steps)
    x = noise
    tokens, pooled = encoder(torch.cat([label, torch.full_like(label, encoder.empty)]))
    for i in range(steps):
        sigma = sigmas[i].repeat(2 * len(label))
        cond, uncond = recipe.call(model, torch.cat([x, x]), sigma, tokens, pooled).chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + cfg * (cond - uncond))
    samples = latent_to_pixels(x).reshape(classes, per_class, 3, IMAGE_SIZE, IMAGE_SIZE)
    data = SkimageDataset(torch.Generator().manual_seed(0))
    real = torch.stack([(data.sample(c) + 1) / 2 for c in range(classes)])[:, None]
    grid = torch.cat([samples, real], dim=1)
    rows = [torch.cat(list(row), dim=2) for row in grid]
    image = torch.cat(rows, dim=1).permute(1, 2, 0).mul(255).round().byte().numpy()
    recipe.grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(recipe.grid)
    logger.info("sample grid: %s", recipe.grid)
    return recipe.grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="flux")
    parser.add_argument("--steps", type=int, help="default: the model's own (Recipe.steps)")
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--label-dropout", type=float, default=0.15)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = RECIPES[args.model]
    args.steps = args.steps or recipe.steps
    if not args.grid_only:
        train(recipe, args)
    sample_grid(recipe)


if __name__ == "__main__":
    main()
