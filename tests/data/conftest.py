"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import write_image, write_rotated_jpeg


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of mixed images: sizes, formats, alpha, palette, EXIF rotation."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "wide.png", (128, 64), seed=1)
    write_image(folder / "tall.jpg", (64, 128), seed=2)
    write_image(folder / "square.webp", (96, 96), seed=3)
    write_image(folder / "alpha.png", (80, 80), mode="RGBA", seed=4)
    write_image(folder / "palette.png", (72, 72), mode="P", seed=5)
    write_rotated_jpeg(folder / "rotated.JPG", (120, 60))
    return folder
