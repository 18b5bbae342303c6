"""The dataset: tensors shaped to their bucket in [-1, 1], prompts from templates, broken files substituted."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from hcpdiff.data import (BucketBatchSampler, DataItem, FixedBucket, ImageCaptionDataset, PromptBuilder, RatioBucket,
                          build_dataset)
from hcpdiff.data.images import read_image_size

from data_helpers import write_image, write_truncated_jpeg


def make_dataset(folder, bucket_factory, captions=None, templates=("{caption}",)):
    paths = sorted(p for p in folder.iterdir())
    image_sizes = {p.name: read_image_size(p) for p in paths}
    bucket = bucket_factory(image_sizes=image_sizes)
    items = [DataItem(str(p), p.name, (captions or {}).get(p.stem), 0) for p in paths]
    return ImageCaptionDataset(items, bucket, [PromptBuilder(list(templates), {"pt1": "pt-cat1"})], seed=3)


def test_tensors_match_bucket_size_and_range(image_folder):
    dataset = make_dataset(image_folder, lambda **kw: RatioBucket.from_files(64 * 64, 3, 32, **kw))
    assert len(dataset) == 6
    for index, item in enumerate(dataset.items):
        sample = dataset[index]
        width, height = dataset.bucket.size_of(item.key)
        assert sample["pixel_values"].shape == (3, height, width)
        assert sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1


def test_rotated_image_goes_to_a_tall_bucket(image_folder):
    dataset = make_dataset(image_folder, lambda **kw: RatioBucket.from_files(64 * 64, 3, 32, **kw))
    width, height = dataset.bucket.size_of("rotated.JPG")
    assert height > width


def test_prompts_fill_template(image_folder):
    dataset = make_dataset(
        image_folder,
        lambda **kw: FixedBucket(32, **kw),
        captions={"wide": "a {pt1} lying down"},
        templates=("a photo of a {pt1}, {caption}",),
    )
    prompts = {item.key: dataset[i]["prompt"] for i, item in enumerate(dataset.items)}
    assert prompts["wide.png"] == "a photo of a pt-cat1, a pt-cat1 lying down"
    assert prompts["tall.jpg"] == "a photo of a pt-cat1"


def test_template_choice_reproducible_and_varies_between_fetches(image_folder):
    templates = [f"t{i} {{caption}}" for i in range(8)]

    def two_epochs():
        dataset = make_dataset(image_folder, lambda **kw: FixedBucket(32, **kw), templates=templates)
        return [[dataset[i]["prompt"] for i in range(len(dataset))] for _ in range(2)]

    first_run, second_run = two_epochs(), two_epochs()
    assert first_run == second_run
    assert first_run[0] != first_run[1]


def test_truncated_image_is_skipped_at_scan_and_warned_once(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", (64, 64), seed=1)
    write_image(folder / "b.png", (64, 64), seed=2)
    write_truncated_jpeg(folder / "c.jpg", (64, 64))
    for name in ("a", "b", "c"):
        (folder / f"{name}.txt").write_text(name.upper())
    node = {"source": {"s1": {"img_root": str(folder), "caption_file": str(folder)}},
            "bucket": {"_target_": "hcpdiff.data.FixedBucket", "target_size": 32}, "batch_size": 1}
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build_dataset(node, "data.dataset1", pixel_step=32, seed=0, show_progress=False)
        prompts = [built.dataset[index]["prompt"] for _ in range(3) for index in range(len(built.dataset))]
    # not counted, never drawn (so never replaced by a copy of another image), named once with its reason
    assert len(built.dataset) == 2 and built.num_images == 2
    assert sorted(set(prompts)) == ["A", "B"]
    warnings = [r.getMessage() for r in caplog.records if "c.jpg" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("1 image(s) in") and "truncated" in warnings[0]
    assert built.sources[0].unreadable == ["c.jpg"]


def test_an_image_broken_after_the_scan_is_substituted_and_warned_once(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", (64, 64), seed=1)
    write_image(folder / "b.png", (64, 64), seed=2)
    write_image(folder / "c.jpg", (64, 64), seed=3)
    dataset = make_dataset(folder, lambda **kw: FixedBucket(32, **kw), captions={"a": "A", "b": "B", "c": "C"})
    write_truncated_jpeg(folder / "c.jpg", (64, 64))  # changed on disk while training
    broken_index = [item.key for item in dataset.items].index("c.jpg")
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        first = dataset[broken_index]
        second = dataset[broken_index]
    assert first["pixel_values"].shape == (3, 32, 32)
    assert first["prompt"] in ("A", "B") and second["prompt"] in ("A", "B")
    warnings = [r for r in caplog.records if "c.jpg" in r.getMessage()]
    assert len(warnings) == 1


def test_dataloader_with_bucket_sampler(image_folder):
    dataset = make_dataset(image_folder, lambda **kw: RatioBucket.from_files(64 * 64, 3, 32, **kw))
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    seen = 0
    for batch in loader:
        assert batch["pixel_values"].ndim == 4 and len(batch["prompt"]) == batch["pixel_values"].shape[0]
        seen += batch["pixel_values"].shape[0]
    assert seen == len(dataset)



def test_samples_carry_original_size_and_crop_for_sdxl(image_folder):
    """Each sample's original (h, w) and crop (top, left), which SDXL is conditioned on."""
    from PIL import Image as PILImage, ImageOps

    dataset = make_dataset(image_folder, lambda **kw: RatioBucket.from_files(64 * 64, 3, 32, **kw))
    for index, item in enumerate(dataset.items):
        sample = dataset[index]
        with PILImage.open(item.path) as img:
            img = ImageOps.exif_transpose(img)
            width, height = img.size
        assert sample["original_size"] == (height, width)
        top, left = sample["crop_top_left"]
        assert top >= 0 and left >= 0 and (top == 0 or left == 0)  # a cover-resize leaves spare room on one axis
