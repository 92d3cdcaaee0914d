"""PSNR and SSIM on known images, against closed forms, scipy and torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from components.evaluate.image_metrics import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW, psnr, ssim


def test_psnr_of_a_constant_offset():
    # [-1, 1] offset 0.2 is 0.1 on the unit range: MSE 0.01 -> 20 dB.
    a = torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(psnr(a + 0.2, a), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(psnr(a, a)).all()


def test_psnr_matches_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 20, 20, generator=g) * 2 - 1, torch.rand(3, 3, 20, 20, generator=g) * 2 - 1
    ours = psnr(a, b)
    for i in range(3):
        ref = peak_signal_noise_ratio((a[i:i + 1] + 1) / 2, (b[i:i + 1] + 1) / 2, data_range=1.0)
        assert float(ours[i]) == pytest.approx(float(ref), abs=1e-4)


def test_ssim_of_constant_images_matches_closed_form():
    # Flat images have zero variance: SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    mx, my = 0.3, 0.7  # unit range
    x = torch.full((1, 3, 16, 16), mx * 2 - 1)
    y = torch.full((1, 3, 16, 16), my * 2 - 1)
    c1 = SSIM_K1**2
    assert float(ssim(x, y)[0]) == pytest.approx((2 * mx * my + c1) / (mx**2 + my**2 + c1), rel=1e-6)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0)


def _scipy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Reference SSIM of one C x H x W unit-range image pair with scipy's Gaussian filter, valid region."""
    radius = (SSIM_WINDOW - 1) // 2
    truncate = radius / SSIM_SIGMA

    def blur(a):
        return scipy.ndimage.gaussian_filter(a, SSIM_SIGMA, truncate=truncate)[radius:-radius, radius:-radius]

    values = []
    for xc, yc in zip(x, y):
        mx, my = blur(xc), blur(yc)
        vx, vy, cxy = blur(xc * xc) - mx**2, blur(yc * yc) - my**2, blur(xc * yc) - mx * my
        c1, c2 = SSIM_K1**2, SSIM_K2**2
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_scipy_and_torchmetrics_on_structured_images():
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    base = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy]).unsqueeze(0).repeat(2, 1, 1, 1) * 0.8
    noisy = (base + 0.3 * torch.randn(base.shape, generator=g)).clamp(-1, 1)
    ours = ssim(noisy, base)
    for i in range(2):
        x = ((noisy[i].double() + 1) / 2).numpy()
        y = ((base[i].double() + 1) / 2).numpy()
        assert float(ours[i]) == pytest.approx(_scipy_ssim(x, y), abs=1e-9)
        # torchmetrics averages its SSIM map over reflect-padded borders too; ours (like Wang et al. and
        # skimage) keeps the valid window positions only, so compare on the valid part of its map.
        _, full = structural_similarity_index_measure(((noisy[i:i + 1].double() + 1) / 2), ((base[i:i + 1].double() + 1) / 2),
                                                      data_range=1.0, gaussian_kernel=True, sigma=SSIM_SIGMA,
                                                      kernel_size=SSIM_WINDOW, return_full_image=True)
        r = (SSIM_WINDOW - 1) // 2
        assert float(ours[i]) == pytest.approx(float(full[..., r:-r, r:-r].mean()), abs=1e-6)
    assert 0.0 < float(ours.min()) < float(ssim(base, base).min())


def test_image_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="psnr"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
