"""Image preparation for the VAE: decode fully, shorter side to the resolution, centre crop, [-1, 1].

The encode stage's pixels path (components/data/encode.py) and its benchmark use it; the crop
records SDXL micro-conditioning (original_size, crop_top_left).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members of a source tar shard


def resize_and_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Shorter side to `resolution`, centre crop to a square (as SDXL's training scripts).

    Returns (uint8 HxWx3 array, original_size (h, w), crop_top_left (top, left)); the crop
    corner is in resized pixels, which is what SDXL's add_time_ids expect.
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC) if (new_w, new_h) != (w, h) else image
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    return np.asarray(cropped, dtype=np.uint8), (h, w), (top, left)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes (lazy PIL decoding would hide truncation until later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_model_input(pixels: np.ndarray, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 BxHxWx3 -> Bx3xHxW in [-1, 1] on `device`. The uint8 batch moves first (4x fewer
    bytes than float32) and is converted there, off the host's critical path."""
    pixels = pixels if pixels.flags.writeable else pixels.copy()  # torch refuses read-only views
    x = torch.from_numpy(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)
