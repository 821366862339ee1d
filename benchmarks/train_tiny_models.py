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
    python -m benchmarks.train_tiny_models --model flux --distil  # the few-step student of the trained model

Distillation (`--distil`) makes the few-step model that 2026's turbo and
lightning checkpoints stand for: multi-step trajectory distillation (the
student learns, from a point on the teacher's sampling path, the straight
step to the teacher's point one coarse step later, as Luhman & Luhman's
one-step distillation does for a single step), with the teacher's guidance
folded in so the student runs at cfg 1. Why this recipe: it needs nothing
but the teacher's own ODE paths, which 2 CPU cores make in minutes, trains
the student for exactly the grids users sample it on, and it is how
step-distilled flow models are commonly bootstrapped. Its coarse steps are
those of 8, 6, 4, 3 and 2 steps on the model's own schedule, all on one
48-step teacher path, so plain sampling with fewer steps is as good as the
student can make it: the baseline caching is compared against is not
handicapped.
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

from .tiny_flux import (BUNDLED_WEIGHTS, DISTILLED_WEIGHTS, LABEL_POOLED_KEY, LABEL_TOKENS_KEY, TinyFlux, flux_sigmas,
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
    distilled: Path  # where --distil writes the few-step student
    distilled_grid: Path


RECIPES = {
    "flux": Recipe(FLUX_CONFIG, "flux_config", TinyFlux, lambda m, x, s, t, p: m(x, s, t, p), BUNDLED_WEIGHTS,
                   load_bundled, flux_sigmas, DOCS / "tiny_flux_samples.png", True,
                   FLUX_CONFIG["context_in_dim"], 2000, DISTILLED_WEIGHTS, DOCS / "tiny_flux_distilled_samples.png"),
    "nextdit": Recipe(NEXTDIT_CONFIG, "nextdit_config", TinyNextDiT, lambda m, x, s, t, p: m(x, s, t),
                      BUNDLED_NEXTDIT_WEIGHTS, load_bundled_nextdit, shifted_flow_sigmas,
                      DOCS / "tiny_nextdit_samples.png", False,
                      NEXTDIT_CONFIG["cap_feat_dim"], 1600,
                      BUNDLED_NEXTDIT_WEIGHTS.with_name("tiny_nextdit_distilled.safetensors"),
                      DOCS / "tiny_nextdit_distilled_samples.png"),
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


class EmaTraining:
    """What training and distillation both run: AdamW on a model and its
    label embedding, the learning rate warmed up then cosine-decayed, the
    gradient clipped at 1, and an EMA copy of both that is what gets saved."""

    def __init__(self, model: nn.Module, labels: nn.Module, lr: float, ema: float, steps: int, warmup: int):
        self.parameters = list(model.parameters()) + list(labels.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.ema_labels = copy.deepcopy(labels).requires_grad_(False)
        self.lr, self.ema, self.steps, self.warmup = lr, ema, steps, warmup

    def step(self, step: int, loss: torch.Tensor) -> float:
        """One optimiser step on `loss` (steps count from 1); returns its learning rate."""
        lr = self.lr * min(1.0, step / self.warmup) * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        decay = min(self.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(list(self.ema_model.parameters()) + list(self.ema_labels.parameters()),
                                self.parameters):
                ema_p.lerp_(p, 1 - decay)
        return lr


def train(recipe: Recipe, args) -> None:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = SkimageDataset(generator)
    model = recipe.build(recipe.config)
    labels = LabelEmbedding(len(CLASS_NAMES), recipe.label_width)
    training = EmaTraining(model, labels, args.lr, args.ema, args.steps, warmup=100)
    empty = len(CLASS_NAMES)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, label = data.batch(args.batch)
        label = torch.where(torch.rand(args.batch, generator=generator) < args.label_dropout,
                            torch.full_like(label, empty), label)
        clean = pixels_to_latent(images)
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=generator))
        noisy = (1 - sigma[:, None, None, None]) * clean + sigma[:, None, None, None] * noise
        prediction = recipe.call(model, noisy, sigma, labels.tokens[label], labels.pooled[label])
        loss = F.mse_loss(prediction, noise - clean)
        lr = training.step(step, loss)
        if step % 50 == 0 or step == 1:
            logger.info("step %d/%d loss %.4f lr %.2e %.0fs", step, args.steps, loss.item(), lr,
                        time.perf_counter() - start)
    save(recipe, training.ema_model, training.ema_labels, args, time.perf_counter() - start)


# The teacher's path: TEACHER_STEPS Euler steps at cfg TEACHER_CFG (its sample
# grid's guidance) on the model's schedule. The student learns the coarse
# steps of every step count here: their grids lie on that path (to the 1e-4
# in t that ComfyUI's integer timestep table rounds them by).
TEACHER_STEPS = 48
TEACHER_CFG = 3.0
DISTIL_STEPS = 700  # at batch 96, with the teacher's paths: under 30 minutes on 2 CPU cores
DISTIL_LR = 3e-4
STUDENT_STEP_COUNTS = {8: 0.35, 6: 0.2, 4: 0.25, 3: 0.1, 2: 0.1}  # step count: share of training samples


@torch.no_grad()
def teacher_paths(recipe: Recipe, model: nn.Module, labels: LabelEmbedding, count: int, batch: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, TEACHER_STEPS + 1, C, H, W) points of the teacher's guided
    Euler paths from seeded noise, and each path's class label."""
    sigmas = recipe.sigmas(TEACHER_STEPS)
    empty = labels.tokens.shape[0] - 1
    paths, classes = [], []
    start = time.perf_counter()
    for first in range(0, count, batch):
        label = torch.randint(empty, (min(batch, count - first),), generator=generator)
        both = torch.cat([label, torch.full_like(label, empty)])
        tokens, pooled = labels.tokens[both], labels.pooled[both]
        x = torch.randn(len(label), recipe.config["in_channels"], IMAGE_SIZE // 2, IMAGE_SIZE // 2,
                        generator=generator)
        points = [x]
        for i in range(TEACHER_STEPS):
            cond, uncond = recipe.call(model, torch.cat([x, x]), sigmas[i].repeat(2 * len(label)), tokens,
                                       pooled).chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + TEACHER_CFG * (cond - uncond))
            points.append(x)
        paths.append(torch.stack(points, dim=1))
        classes.append(label)
        logger.info("teacher paths %d/%d %.0fs", first + len(label), count, time.perf_counter() - start)
    return torch.cat(paths), torch.cat(classes)


def distil(recipe: Recipe, args) -> None:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    teacher, encoder, _ = recipe.load()
    labels = LabelEmbedding(len(CLASS_NAMES), recipe.label_width)
    with torch.no_grad():
        labels.tokens.copy_(encoder.tokens)
        if recipe.pooled:
            labels.pooled.copy_(encoder.pooled)
    start = time.perf_counter()
    paths, path_labels = teacher_paths(recipe, teacher, labels, args.paths, 96, generator)
    sigmas = recipe.sigmas(TEACHER_STEPS)
    student = teacher.train().requires_grad_(True)
    training = EmaTraining(student, labels, args.lr, args.ema, args.steps, warmup=20)
    counts = torch.tensor(list(STUDENT_STEP_COUNTS))
    shares = torch.tensor(list(STUDENT_STEP_COUNTS.values()))
    for step in range(1, args.steps + 1):
        path = torch.randint(len(paths), (args.batch,), generator=generator)
        stride = TEACHER_STEPS // counts[torch.multinomial(shares, args.batch, replacement=True, generator=generator)]
        begin = (torch.rand(args.batch, generator=generator) * (TEACHER_STEPS // stride)).long() * stride
        end = begin + stride
        x_begin, x_end = paths[path, begin], paths[path, end]
        sigma_begin, sigma_end = sigmas[begin], sigmas[end]
        # The straight step from x_begin to the teacher's x_end, as a velocity.
        target = (x_end - x_begin) / (sigma_end - sigma_begin)[:, None, None, None]
        label = path_labels[path]
        tokens, pooled = labels.tokens[label], labels.pooled[label]
        loss = F.mse_loss(recipe.call(student, x_begin, sigma_begin, tokens, pooled), target)
        lr = training.step(step, loss)
        if step % 25 == 0 or step == 1:
            logger.info("distil step %d/%d loss %.4f lr %.2e %.0fs", step, args.steps, loss.item(), lr,
                        time.perf_counter() - start)
    recipe_notes = {"recipe": "multi-step trajectory distillation, guidance folded in",
                    "teacher": recipe.weights.name, "teacher_steps": TEACHER_STEPS, "teacher_cfg": TEACHER_CFG,
                    "student_step_counts": STUDENT_STEP_COUNTS, "paths": args.paths}
    save(recipe, training.ema_model.eval(), training.ema_labels, args, time.perf_counter() - start,
         recipe.distilled, recipe_notes)


def save(recipe: Recipe, model: nn.Module, labels: LabelEmbedding, args, seconds: float, path: Path | None = None,
         training: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state[LABEL_TOKENS_KEY] = labels.tokens.detach().to(torch.float16).contiguous()
    if recipe.pooled:
        state[LABEL_POOLED_KEY] = labels.pooled.detach().to(torch.float16).contiguous()
    metadata = {
        recipe.config_key: json.dumps(recipe.config),
        "labels": json.dumps(CLASS_NAMES),
        "training": json.dumps({**(training or {"label_dropout": args.label_dropout}), "steps": args.steps,
                                "batch": args.batch, "lr": args.lr, "seed": args.seed, "ema": args.ema,
                                "seconds": round(seconds)}),
        "latent": "pixel_unshuffle(rgb in [-1, 1], 2): 12 channels at half resolution",
    }
    path = path or recipe.weights
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    logger.info("saved %s (%.1f MB)", path, path.stat().st_size / 1e6)


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


@torch.no_grad()
def guided_samples(recipe: Recipe, model, encoder, label: torch.Tensor, noise: torch.Tensor, steps: int,
                   cfg: float) -> torch.Tensor:
    """Euler on the model's schedule; at cfg 1 only the conditional pass runs."""
    sigmas = recipe.sigmas(steps)
    x = noise
    both = label if cfg == 1 else torch.cat([label, torch.full_like(label, encoder.empty)])
    tokens, pooled = encoder(both)
    for i in range(steps):
        output = recipe.call(model, x if cfg == 1 else torch.cat([x, x]), sigmas[i].repeat(len(both)), tokens, pooled)
        if cfg != 1:
            cond, uncond = output.chunk(2)
            output = uncond + cfg * (cond - uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * output
    return latent_to_pixels(x)


def distilled_grid(recipe: Recipe, per_class: int = 4) -> Path:
    """Rows: classes; columns: the teacher at 50 steps and cfg 3, then the
    student at 8 and at 4 steps and cfg 1, on the same seeds. Logs how close
    the student gets to its teacher (PSNR), next to the teacher's own 8 and 4 steps."""
    from PIL import Image

    from .metrics import psnr

    teacher, encoder, _ = recipe.load()
    student, student_encoder, _ = recipe.load(recipe.distilled)
    classes = len(encoder.names)
    label = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(label), recipe.config["in_channels"], IMAGE_SIZE // 2, IMAGE_SIZE // 2,
                        generator=torch.Generator().manual_seed(1234))
    reference = guided_samples(recipe, teacher, encoder, label, noise, 50, TEACHER_CFG)
    columns = [reference]
    for steps in (8, 4):
        images = guided_samples(recipe, student, student_encoder, label, noise, steps, 1.0)
        columns.append(images)
        teacher_few = guided_samples(recipe, teacher, encoder, label, noise, steps, TEACHER_CFG)
        logger.info("%d steps against the teacher at 50: student %.2f dB, teacher %.2f dB", steps,
                    psnr(images, reference), psnr(teacher_few, reference))
    grid = torch.cat([c.reshape(classes, per_class, 3, IMAGE_SIZE, IMAGE_SIZE) for c in columns], dim=1)
    rows = [torch.cat(list(row), dim=2) for row in grid]
    image = torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().numpy()
    recipe.distilled_grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(recipe.distilled_grid)
    logger.info("sample grid: %s", recipe.distilled_grid)
    return recipe.distilled_grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="flux")
    parser.add_argument("--steps", type=int, help="default: the model's own (Recipe.steps)")
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--lr", type=float, help="default: 1e-3, with --distil DISTIL_LR")
    parser.add_argument("--label-dropout", type=float, default=0.15)
    parser.add_argument("--ema", type=float, help="default: 0.999, with --distil 0.995")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-only", action="store_true")
    parser.add_argument("--distil", action="store_true", help="train the few-step student of the saved model")
    parser.add_argument("--paths", type=int, default=1152, help="--distil: teacher paths to learn from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = RECIPES[args.model]
    if args.distil:
        args.steps = args.steps or DISTIL_STEPS
        args.lr = DISTIL_LR if args.lr is None else args.lr
        args.ema = 0.995 if args.ema is None else args.ema
        if not args.grid_only:
            distil(recipe, args)
        distilled_grid(recipe)
        return
    args.steps = args.steps or recipe.steps
    args.lr = 1e-3 if args.lr is None else args.lr
    args.ema = 0.999 if args.ema is None else args.ema
    if not args.grid_only:
        train(recipe, args)
    sample_grid(recipe)


if __name__ == "__main__":
    main()
