"""Image-making helpers for the data tests: small noisy files written with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


def write_image(path: Path, size_wh: tuple[int, int], mode: str = "RGB", seed: int = 0, **save_kwargs) -> Path:
    """Write a noisy image (noise keeps jpeg/webp files large enough to truncate meaningfully)."""
    rng = np.random.default_rng(seed)
    width, height = size_wh
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


def write_truncated_jpeg(path: Path, size_wh: tuple[int, int] = (64, 64)) -> Path:
    """A JPEG whose header is intact but whose pixel data stops halfway."""
    write_image(path, size_wh)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_rotated_jpeg(path: Path, stored_wh: tuple[int, int], orientation: int = 6) -> Path:
    """A JPEG stored at stored_wh with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return write_image(path, stored_wh, exif=exif.tobytes())
