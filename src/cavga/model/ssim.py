"""Structural similarity (Wang et al., 2004) of two image batches, as a map: the AE-SSIM baseline's loss and map,
and CAVGA's ``ssim`` image score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Bergmann et al. and Wang et al. (2004): 11 x 11 Gaussian window, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """A normalized (size, size) Gaussian kernel."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, data_range: float = 1.0
) -> torch.Tensor:
    """Local SSIM of two (B, C, H, W) batches, averaged over channels: (B, 1, H, W).

    Wang et al. (2004) with a Gaussian window; borders are reflect-padded so every pixel gets a value."""
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x).expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=1, keepdim=True)
