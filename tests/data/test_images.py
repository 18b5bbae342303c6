"""Image helpers: header sizes with EXIF rotation, RGB loading with transparency, cover-resize + crop, tensors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hcpdiff.data.images import load_image, read_image_size, resize_and_crop, to_tensor

from data_helpers import write_image, write_rotated_jpeg, write_truncated_jpeg


def test_read_image_size_formats(image_folder):
    assert read_image_size(image_folder / "wide.png") == (128, 64)
    assert read_image_size(image_folder / "tall.jpg") == (64, 128)
    assert read_image_size(image_folder / "square.webp") == (96, 96)


@pytest.mark.parametrize("orientation, expected", [(1, (120, 60)), (3, (120, 60)), (6, (60, 120)), (8, (60, 120))])
def test_exif_orientation_swaps_size(tmp_path, orientation, expected):
    path = write_rotated_jpeg(tmp_path / "r.jpg", (120, 60), orientation)
    assert read_image_size(path) == expected
    assert load_image(path).size == expected


def test_truncated_file_header_reads_but_decode_fails(tmp_path):
    path = write_truncated_jpeg(tmp_path / "cut.jpg")
    assert read_image_size(path) == (64, 64)
    with pytest.raises(OSError):
        load_image(path)


def test_rgba_composited_on_bg_color(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    img.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png", bg_color=(0, 255, 0))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (0, 255, 0)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_composited(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (200, 100, 50)


def test_grayscale_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "g.png", (8, 8), mode="L")
    assert load_image(path).mode == "RGB"


@pytest.mark.parametrize(
    "source_wh, bucket_wh", [((128, 64), (64, 64)), ((64, 128), (128, 64)), ((30, 40), (64, 96)), ((64, 64), (64, 64))]
)
def test_resize_and_crop_covers_then_crops(source_wh, bucket_wh):
    img = Image.new("RGB", source_wh, (10, 20, 30))
    assert resize_and_crop(img, bucket_wh).size == bucket_wh


def test_crop_is_centered():
    # A wide image with a red center stripe: after cropping to a square, the center is red and the edges are too.
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))
    cropped = resize_and_crop(img, (64, 64))
    assert cropped.getpixel((2, 32))[0] > 200 and cropped.getpixel((61, 32))[0] > 200


def test_to_tensor_range_and_shape():
    img = Image.new("RGB", (5, 3), (0, 255, 0))
    tensor = to_tensor(img)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0], torch.full((3, 5), -1.0)) and torch.equal(tensor[1], torch.full((3, 5), 1.0))


def test_resize_and_crop_box_gives_the_window_top_left() -> None:
    """SDXL's crop conditioning: (top, left) of the bucket window in the resized image."""
    from hcpdiff.data.images import resize_and_crop_box

    img = Image.new("RGB", (200, 100))
    cropped, (top, left) = resize_and_crop_box(img, (64, 64))
    assert cropped.size == (64, 64) and (top, left) == (0, (128 - 64) // 2)
    assert resize_and_crop_box(Image.new("RGB", (64, 64)), (64, 64))[1] == (0, 0)


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_decoded_at_reduced_scale_keeps_full_geometry(tmp_path, monkeypatch, orientation):
    """A photo 8x its bucket decodes through a JPEG draft: same window and sizes, pixels close to a full decode."""
    import numpy as np

    from hcpdiff.data.images import load_for_bucket, resize_and_crop_box

    gradient = np.linspace(0, 255, 1200, dtype=np.float32)
    pixels = np.stack([np.tile(gradient, (800, 1)), np.tile(gradient[:800, None], (1, 1200)),
                       np.full((800, 1200), 90.0)], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    upright_wh = (1200, 800) if orientation == 1 else (800, 1200)
    from PIL import JpegImagePlugin

    decoded_sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: (real_draft(self, *a), decoded_sizes.append(self.size))[0])
    fast, original_wh, top_left = load_for_bucket(path, (96, 64))
    assert len(decoded_sizes) == 1 and decoded_sizes[0][0] * 4 <= 1200  # decoded at a quarter scale or less
    full, full_top_left = resize_and_crop_box(load_image(path), (96, 64))
    assert original_wh == upright_wh and top_left == full_top_left and fast.size == full.size == (96, 64)
    difference = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert difference.mean() < 2.0
