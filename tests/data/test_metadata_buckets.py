"""DiffSynth-style metadata (columns, subfolders, json lists), MaxPixelsBucket, and the upscale warning."""

from __future__ import annotations

import json
import logging

import pytest

from hcpdiff.data import MaxPixelsBucket, build_dataset
from hcpdiff.errors import DataError

from data_helpers import write_image

MAX_PIXELS = {"_target_": "hcpdiff.data.MaxPixelsBucket", "max_pixels": 64 * 64, "step_size": 16}


def build(folder, bucket=MAX_PIXELS, **source_fields):
    node = {"batch_size": 2, "source": {"s1": {"img_root": str(folder), **source_fields}}, "bucket": bucket}
    return build_dataset(node, "data.dataset1", pixel_step=8, seed=0)


@pytest.fixture
def nested(tmp_path):
    root = tmp_path / "dataset"
    (root / "train" / "cats").mkdir(parents=True)
    (root / "train" / "dogs").mkdir(parents=True)
    write_image(root / "top.png", (64, 64))
    write_image(root / "train" / "cats" / "1.jpg", (128, 64))
    write_image(root / "train" / "dogs" / "1.jpg", (64, 128))
    return root


def prompts_by_key(built) -> dict[str, str]:
    return {item.key: built.dataset.sample_prompt(i) for i, item in enumerate(built.dataset.items)}


def test_metadata_csv_names_images_in_subfolders(nested):
    (nested / "metadata.csv").write_text(
        "file_name,text\ntrain/cats/1.jpg,a cat\n./train/dogs/1.jpg,a dog\ntop.png,on top\n"
    )
    built = build(nested, caption_file="metadata.csv")
    assert built.num_images == 3
    assert prompts_by_key(built) == {"s1/top.png": "on top", "s1/train/cats/1.jpg": "a cat", "s1/train/dogs/1.jpg": "a dog"}
    assert [r.num_captioned for r in built.sources] == [3]


def test_custom_columns_in_json_list_and_jsonl(nested):
    records = [{"img": "train/cats/1.jpg", "caption": "c", "text": "wrong"}, {"img": "top.png", "caption": "t"}]
    (nested / "meta.json").write_text(json.dumps(records))
    built = build(nested, caption_file="meta.json", image_column="img", caption_column="caption")
    assert prompts_by_key(built) == {"s1/top.png": "t", "s1/train/cats/1.jpg": "c"}
    (nested / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    built = build(nested, caption_file="meta.jsonl", image_column="img", caption_column="caption")
    assert prompts_by_key(built)["s1/train/cats/1.jpg"] == "c"


def test_auto_detected_image_prompt_columns(nested):
    (nested / "metadata.csv").write_text("image,prompt\ntrain/dogs/1.jpg,dog\n")
    assert prompts_by_key(build(nested, caption_file="metadata.csv"))["s1/train/dogs/1.jpg"] == "dog"


def test_wrong_column_is_named(nested):
    (nested / "metadata.csv").write_text("file_name,text\ntop.png,x\n")
    with pytest.raises(DataError, match="header 'file_name,text'; image_column / caption_column ask for 'file_name"):
        build(nested, caption_file="metadata.csv", caption_column="caption")


def test_max_pixels_bucket_keeps_aspect_and_only_downscales():
    sizes = {"big": (1024, 512), "small": (100, 50), "odd": (300, 300), "big2": (2048, 1024)}
    bucket = MaxPixelsBucket(256 * 256, 64, image_sizes=sizes)
    assert bucket.size_of("big") == bucket.size_of("big2") == (320, 128)  # 362x181 snapped down
    assert bucket.size_of("small") == (64, 64) and bucket.size_of("odd") == (256, 256)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 256 * 256 for w, h in bucket.sizes)
    assert len(bucket.sizes) == 3
    with pytest.raises(DataError, match="max_pixels must be at least"):
        MaxPixelsBucket(100, 64, image_sizes=sizes)


def test_max_pixels_batches_are_single_size(nested):
    (nested / "metadata.csv").write_text("file_name,text\ntrain/cats/1.jpg,a\ntrain/dogs/1.jpg,b\n")
    built = build(nested, caption_file="metadata.csv")
    assert sorted(built.bucket.sizes) == [(32, 80), (64, 64), (80, 32)]  # 128x64 -> 90x45 -> step 16
    for batch in built.batch_sampler:
        shapes = {tuple(built.dataset[i]["pixel_values"].shape) for i in batch}
        assert len(shapes) == 1


def test_upscale_warning_is_one_line_with_count(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", (32, 32))
    write_image(folder / "b.png", (40, 20))
    write_image(folder / "c.png", (256, 256))
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build(folder, bucket={"_target_": "hcpdiff.data.FixedBucket", "target_size": 64})
    lines = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert built.num_upscaled == 2 and len(lines) == 1
    assert "2 of 3 images are smaller than their bucket size" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        assert build(folder).num_upscaled == 0  # MaxPixelsBucket never upscales
    assert not [r for r in caplog.records if "upscaled" in r.getMessage()]
