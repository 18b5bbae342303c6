"""Images that cannot be used are skipped once at the scan, with the reason and the setting that changes it."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcpdiff.data import build_dataset
from hcpdiff.data.images import UnusableImage, scan_image
from hcpdiff.errors import ConfigError

KEY = "data.dataset1"


def write_image(path: Path, size_wh: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size_wh[1], size_wh[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_huge_png_header(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG that declares width x height pixels (its header is all Pillow reads to refuse it): a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def node(folder: Path, **source_fields) -> dict:
    return {"source": {"s1": {"img_root": str(folder), "caption_file": str(folder), **source_fields}},
            "bucket": {"_target_": "hcpdiff.data.FixedBucket", "target_size": 32}, "batch_size": 1}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index, name in enumerate(("a", "b")):
        write_image(folder / f"{name}.png", seed=index)
        (folder / f"{name}.txt").write_text(name.upper())
    return folder


@pytest.fixture
def pil_limit(monkeypatch):
    """Put Pillow's process-wide pixel limit back after the test (max_image_pixels raises it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def test_truncated_png_and_jpeg_are_skipped_and_counted_once(folder, caplog):
    truncate(write_image(folder / "c.png", seed=3))
    jpeg = folder / "d.jpg"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    truncate(jpeg)
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build_dataset(node(folder), KEY, pixel_step=32, seed=0, show_progress=False)
        for _ in range(3):  # three epochs: no file is ever substituted, so no decode warning either
            prompts = sorted(built.dataset[index]["prompt"] for index in range(len(built.dataset)))
            assert prompts == ["A", "B"]
    assert len(built.dataset) == 2 and built.num_images == 2
    lines = [r.getMessage() for r in caplog.records if "c.png" in r.getMessage() or "d.jpg" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("2 image(s) in") and "c.png: truncated" in lines[0] and "d.jpg: truncated" in lines[0]


def test_a_whole_image_is_not_taken_for_truncated(folder):
    for path in folder.glob("*.png"):
        assert scan_image(path) == (64, 64)
    jpeg = folder / "whole.jpg"
    Image.open(folder / "a.png").save(jpeg, quality=90)
    webp = folder / "whole.webp"
    Image.open(folder / "a.png").save(webp)
    assert scan_image(jpeg) == (64, 64) and scan_image(webp) == (64, 64)
    truncate(webp)  # cut this short, a WebP fails at its header already
    with pytest.raises(UnusableImage, match="truncated|unreadable"):
        scan_image(webp)


def test_a_decompression_bomb_says_why_and_which_setting_raises_the_limit(folder, caplog, pil_limit):
    write_huge_png_header(folder / "huge.png")
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build_dataset(node(folder), KEY, pixel_step=32, seed=0, show_progress=False)
    assert built.num_images == 2
    lines = [r.getMessage() for r in caplog.records if "huge.png" in r.getMessage()]
    assert len(lines) == 1
    assert "decompression-bomb limit" in lines[0] and "400000000 pixels" in lines[0]
    assert f"set {KEY}.source.s1.max_image_pixels" in lines[0]


def test_max_image_pixels_raises_or_lowers_the_limit_per_source(folder, caplog, pil_limit):
    huge = write_huge_png_header(folder / "huge.png")
    assert scan_image(huge, max_pixels=20000 * 20000) == (20000, 20000)
    write_image(folder / "small.png", (16, 16))
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build_dataset(node(folder, max_image_pixels=1000), KEY, pixel_step=16, seed=0, show_progress=False)
    assert built.num_images == 1  # only the 16x16 image is within 1000 pixels
    lines = [r.getMessage() for r in caplog.records if "a.png" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("3 image(s)") and "64x64 is over max_image_pixels 1000" in lines[0]


def test_max_image_pixels_must_be_positive(folder):
    with pytest.raises(ConfigError, match=r"`data.dataset1.source.s1.max_image_pixels`: must be >= 1"):
        build_dataset(node(folder, max_image_pixels=0), KEY, pixel_step=32, seed=0, show_progress=False)
