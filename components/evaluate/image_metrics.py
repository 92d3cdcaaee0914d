"""Teacher agreement: PSNR and SSIM of one image set against another drawn from the same noise.

Images follow the project convention, Bx3xHxW floats in [-1, 1]; both metrics map them to
[0, 1] (data range 1) first, so the numbers match the usual 8-bit definitions up to quantisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window size (Wang et al. 2004, sec. III-C)
SSIM_SIGMA = 1.5  # Gaussian window standard deviation
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants, C1 = (K1 L)^2, C2 = (K2 L)^2


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    return ((images.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{name}: expected two Bx3xHxW image batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(L^2 / MSE) with L = 1 on [0, 1] images: B (float64; inf where equal)."""
    _check_pair(images, reference, "psnr")
    mse = (_unit_range(images) - _unit_range(reference)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window, size x size (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, eq. 13), mean over channels and valid window positions: B.

    SSIM(x, y) = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    local statistics under a Gaussian window (sigma 1.5, 11 x 11), data range L = 1.
    """
    _check_pair(images, reference, "ssim")
    if min(images.shape[-2:]) < window:
        raise ValueError(f"ssim: images {tuple(images.shape[-2:])} are smaller than the {window}x{window} window")
    x, y = _unit_range(images), _unit_range(reference)
    channels = x.shape[1]
    kernel = gaussian_window(window, sigma).to(x.device).expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)
