"""Image reading and shaping with PIL and numpy: header sizes, RGB loading, cover-resize + crop, tensors."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Errors PIL raises for files that are not, or not whole, images.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, read from the file header without decoding pixels."""
    with Image.open(path) as img:
        width, height = img.size
        # img.getexif() would decode a whole PNG to look for a trailing eXIf chunk; header EXIF is enough.
        exif_bytes = img.info.get("exif")
        if exif_bytes:
            exif = Image.Exif()
            exif.load(exif_bytes)
            if exif.get(_EXIF_ORIENTATION_TAG) in _SWAPPING_ORIENTATIONS:
                return height, width
    return width, height


def load_image(path: str | os.PathLike, bg_color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as RGB, transparency composited on bg_color."""
    with Image.open(path) as opened:
        opened.load()
        img = ImageOps.exif_transpose(opened)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(bg_color) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(
    img: Image.Image, size_wh: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> Image.Image:
    """Resize to cover `size_wh` (keeping the aspect ratio), then crop the center (or a random window) to it."""
    return resize_and_crop_box(img, size_wh, crop, rng)[0]


def resize_and_crop_box(
    img: Image.Image, size_wh: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """As resize_and_crop, also giving the window's (top, left) in the resized image (SDXL's crop conditioning)."""
    bucket_width, bucket_height = size_wh
    width, height = img.size
    if (width, height) == (bucket_width, bucket_height):
        return img, (0, 0)
    scale = max(bucket_width / width, bucket_height / height)
    resized_wh = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    resized = img.resize(resized_wh, Image.Resampling.LANCZOS, reducing_gap=3.0)
    spare_x, spare_y = resized_wh[0] - bucket_width, resized_wh[1] - bucket_height
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return resized.crop((left, top, left + bucket_width, top + bucket_height)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor [3, H, W] scaled to [-1, 1]."""
    pixels = np.array(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
