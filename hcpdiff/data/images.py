"""Image reading and shaping with PIL and numpy: header sizes, RGB loading, cover-resize + crop, tensors."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Errors PIL raises for files that are not, or not whole, images.
# A JPEG draft keeps at least this many times the resized size, for the resampling pass (Pillow's thumbnail default).
_DRAFT_GAP = 2.0
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnusableImage(Exception):
    """An image file the data scan skips; the message says why in a few words."""


def allow_image_pixels(max_pixels: int) -> None:
    """Let Pillow open images of up to `max_pixels` pixels (a source's `max_image_pixels`).

    Pillow refuses, as a possible decompression bomb, any image over 2 x `Image.MAX_IMAGE_PIXELS` (179 million
    pixels by default), and that limit is one per process. It is only ever raised here, never lowered, so sources
    (and threads) asking for different limits cannot undo each other; each source's own limit is enforced by
    `scan_image`.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:  # Pillow warns above this and refuses above twice it
        Image.MAX_IMAGE_PIXELS = max_pixels


def _is_complete(path: str | os.PathLike) -> bool:
    """Whether a PNG reaches its IEND chunk, a JPEG its end-of-image marker, a WebP its RIFF size (read from the
    file's structure, no pixels decoded); other formats are taken as whole."""
    with open(path, "rb") as file:
        head = file.read(12)
        file.seek(0, os.SEEK_END)
        size = file.tell()
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            position = 8
            while position + 8 <= size:  # chunk: length (4), type (4), data, crc (4)
                file.seek(position)
                header = file.read(8)
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                position += 12 + length
                if kind == b"IEND":
                    return position <= size
            return False
        if head.startswith(b"\xff\xd8"):
            # 0xFF in entropy-coded data is always stuffed (FF 00), so FF D9 near the end is the end-of-image marker
            file.seek(max(0, size - 1024))
            return b"\xff\xd9" in file.read()
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return int.from_bytes(head[4:8], "little") + 8 <= size
    return True


def scan_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) upright of an image that is whole and within the pixel limit; else UnusableImage saying why.

    `max_pixels` None keeps Pillow's decompression-bomb limit; a number replaces it (see allow_image_pixels).
    """
    if max_pixels is not None:
        allow_image_pixels(max_pixels)
    try:
        width, height = read_image_size(path)
    except Image.DecompressionBombError as err:
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise UnusableImage(f"over Pillow's decompression-bomb limit of {limit} pixels ({err})") from err
    except UnidentifiedImageError as err:
        raise UnusableImage("not an image") from err
    except IMAGE_READ_ERRORS as err:  # the header itself is cut short or broken
        raise UnusableImage(f"unreadable ({str(err).replace(str(path), 'file')})") from err
    if max_pixels is not None and width * height > max_pixels:
        raise UnusableImage(f"{width}x{height} is over max_image_pixels {max_pixels}")
    if not _is_complete(path):
        raise UnusableImage("truncated (the file ends before its image data does)")
    return width, height


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
    with _open_upright(path, bg_color) as (img, _):
        return img.copy()


def load_for_bucket(
    path: str | os.PathLike,
    bucket_wh: tuple[int, int],
    bg_color: tuple[int, int, int] = (255, 255, 255),
    crop: str = "center",
    rng: random.Random | None = None,
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Decode, cover-resize and crop to `bucket_wh`: (image, original upright (w, h), crop window (top, left)).

    A JPEG much larger than its bucket is decoded at a reduced scale (libjpeg's DCT scaling, as Pillow's thumbnail
    does) that still leaves twice the resized size for the bicubic pass, so large photos cost a fraction of a full
    decode; the geometry (resized size, crop window) is always computed from the full image.
    """
    with _open_upright(path, bg_color, cover_wh=bucket_wh) as (img, original_wh):
        cropped, top_left = resize_and_crop_box(img, bucket_wh, crop, rng, source_wh=original_wh)
        return (img.copy() if cropped is img else cropped), original_wh, top_left


@contextlib.contextmanager
def _open_upright(
    path: str | os.PathLike, bg_color: tuple[int, int, int], cover_wh: tuple[int, int] | None = None
) -> Iterator[tuple[Image.Image, tuple[int, int]]]:
    """(upright RGB image, the full image's upright (w, h)), valid inside the block only (it may be the open file).

    With `cover_wh`, a JPEG is decoded at the smallest DCT scale that is still twice the size covering cover_wh.
    """
    with Image.open(path) as opened:
        orientation = opened.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        full_wh = opened.size
        if orientation in _SWAPPING_ORIENTATIONS:
            full_wh = (full_wh[1], full_wh[0])
        if cover_wh is not None and opened.format == "JPEG":
            scale = _DRAFT_GAP * max(cover_wh[0] / full_wh[0], cover_wh[1] / full_wh[1])
            if scale <= 0.5:  # DCT scaling at least halves, or it changes nothing
                opened.draft(None, (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))
        opened.load()
        # exif_transpose copies even when there is nothing to turn; skip it for upright files.
        img = ImageOps.exif_transpose(opened) if orientation != 1 else opened
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, tuple(bg_color) + (255,))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        yield img, full_wh


def resize_and_crop(
    img: Image.Image, size_wh: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> Image.Image:
    """Resize to cover `size_wh` (keeping the aspect ratio), then crop the center (or a random window) to it."""
    return resize_and_crop_box(img, size_wh, crop, rng)[0]


def resize_and_crop_box(
    img: Image.Image,
    size_wh: tuple[int, int],
    crop: str = "center",
    rng: random.Random | None = None,
    source_wh: tuple[int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """As resize_and_crop, also giving the window's (top, left) in the resized image (SDXL's crop conditioning).

    `source_wh` is the size the geometry is computed from when `img` is a reduced decode of a larger image.
    """
    bucket_width, bucket_height = size_wh
    width, height = source_wh or img.size
    if (width, height) == (bucket_width, bucket_height) == img.size:
        return img, (0, 0)
    scale = max(bucket_width / width, bucket_height / height)
    resized_wh = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    # Antialiased bicubic: what diffusers' and kohya's scripts get from torchvision / cv2, at 2/3 of Lanczos' cost.
    resized = img.resize(resized_wh, Image.Resampling.BICUBIC, reducing_gap=3.0)
    spare_x, spare_y = resized_wh[0] - bucket_width, resized_wh[1] - bucket_height
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return resized.crop((left, top, left + bucket_width, top + bucket_height)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor [3, H, W] scaled to [-1, 1]."""
    return unit_range(to_uint8_tensor(img))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ByteTensor [3, H, W] (a quarter of the float tensor's bytes to collate and copy)."""
    pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1)


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1], on their device: to_tensor's values, bit for bit."""
    return pixels.float().div_(127.5).sub_(1.0)
