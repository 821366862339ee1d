"""Image quality against the full-compute output, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the PSNR in dB, for pixels in [0, 1]."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).mean().item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03) over images and channels, for pixels in [0, 1]; windows are
    taken where they fit inside the image."""
    x, y = images.float(), reference.float()
    channels = x.shape[1]
    window = _gaussian_window().to(x.device).expand(channels, 1, -1, -1)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.mean().item()
