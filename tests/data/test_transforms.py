"""Caption transforms and image flip / crop: what a user sees in prompts and pixels, reproducibly."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from hcpdiff.data import CaptionTransform, build_dataset
from hcpdiff.data.images import resize_and_crop
from hcpdiff.errors import ConfigError

from data_helpers import write_image

CAPTION = "1girl, solo, red hair, smile, outdoors, sky"
FIXED = {"_target_": "hcpdiff.data.FixedBucket", "target_size": 64}


def test_defaults_change_nothing():
    assert CaptionTransform().apply(CAPTION, random.Random(0)) == CAPTION


def test_shuffle_keeps_first_tokens_and_all_tags():
    transform = CaptionTransform(tag_shuffle=True, keep_tokens=2)
    results = {transform.apply(CAPTION, random.Random(i)) for i in range(20)}
    assert len(results) > 1
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["1girl", "solo"] and sorted(tags) == sorted(CAPTION.split(", "))


def test_tag_dropout_never_drops_kept_tags():
    transform = CaptionTransform(keep_tokens=1, tag_dropout=1.0)
    assert transform.apply(CAPTION, random.Random(0)) == "1girl"
    half = [CaptionTransform(tag_dropout=0.5).apply(CAPTION, random.Random(i)).count(",") for i in range(50)]
    assert 0 < sum(half) / len(half) < 5


def test_caption_dropout_and_none():
    assert CaptionTransform(caption_dropout=1.0).apply(CAPTION, random.Random(0)) is None
    assert CaptionTransform(tag_shuffle=True).apply(None, random.Random(0)) is None


def make_dataset(tmp_path, **source_fields):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    write_image(folder / "a.png", (96, 64), seed=1)
    (folder / "a.txt").write_text(CAPTION)
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of {pt1}, {caption}\n")
    source = {"img_root": str(folder), "caption_file": str(folder), "prompt_template": str(templates),
              "word_names": {"pt1": "sks"}, **source_fields}
    node = {"batch_size": 1, "source": {"s1": source}, "bucket": FIXED}
    return build_dataset(node, "data.dataset1", pixel_step=8, seed=3).dataset


def test_dataset_applies_transforms_before_template_reproducibly(tmp_path):
    dataset = make_dataset(tmp_path, tag_shuffle=True, keep_tokens=1)
    prompts = [dataset[0]["prompt"] for _ in range(6)]
    assert all(p.startswith("a photo of sks, 1girl, ") for p in prompts)
    assert len(set(prompts)) > 1  # a new order per draw (epoch)
    again = make_dataset(tmp_path, tag_shuffle=True, keep_tokens=1)
    assert [again[0]["prompt"] for _ in range(6)] == prompts
    assert [again.sample_prompt(0, draw) for draw in range(6)] == prompts


def test_caption_dropout_leaves_template(tmp_path):
    assert make_dataset(tmp_path, caption_dropout=1.0)[0]["prompt"] == "a photo of sks"


@pytest.mark.parametrize(
    "field, value, message",
    [("tag_dropout", 1.5, "tag_dropout must be a probability"), ("keep_tokens", -1, "keep_tokens must be 0"),
     ("crop", "left", "crop must be one of center, random")],
)
def test_bad_values_name_the_key(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=rf"data\.dataset1\.source\.s1\.{field}.*{message.split(' ', 1)[1]}"):
        make_dataset(tmp_path, **{field: value})


def test_random_crop_and_flip(tmp_path):
    image = Image.new("RGB", (128, 64))
    image.paste((255, 0, 0), (0, 0, 64, 64))
    center = resize_and_crop(image, (64, 64))  # the window x = 32..95: red then black
    assert center.getpixel((0, 0)) == (255, 0, 0) and center.getpixel((63, 0)) == (0, 0, 0)
    corners = {resize_and_crop(image, (64, 64), "random", random.Random(i)).getpixel((40, 0)) for i in range(30)}
    assert corners == {(255, 0, 0), (0, 0, 0)}
    plain = make_dataset(tmp_path)[0]["pixel_values"]
    dataset = make_dataset(tmp_path, random_flip=True)
    draws = [dataset[0]["pixel_values"] for _ in range(8)]
    assert any(torch.equal(d, plain) for d in draws) and any(torch.equal(d, plain.flip(-1)) for d in draws)
