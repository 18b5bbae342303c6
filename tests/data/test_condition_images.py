"""Condition images (an editing model's input image): named per row by `condition_column`, cut and flipped exactly
as their target image, skipped with one warning when missing, refused in one line when the table lacks the column."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hcpdiff.data import build_dataset
from hcpdiff.errors import ConfigError, DataError

from data_helpers import write_image

BUCKET = {"_target_": "hcpdiff.data.MaxPixelsBucket", "max_pixels": 32 * 32, "step_size": 16}


def build(folder, uint8_pixels=False, **source_fields):
    node = {"batch_size": 2, "source": {"s1": {"img_root": str(folder), **source_fields}}, "bucket": BUCKET}
    return build_dataset(node, "data.dataset1", pixel_step=16, seed=0, uint8_pixels=uint8_pixels)


@pytest.fixture
def edits(tmp_path):
    """Two targets 80x48 (cropped to a 32-px-tall bucket) with their inputs beside them, DiffSynth's layout."""
    root = tmp_path / "edits"
    root.mkdir()
    for i in range(2):
        write_image(root / f"target{i}.png", (80, 48), seed=i)
        write_image(root / f"input{i}.png", (80, 48), seed=10 + i)
    return root


def test_condition_image_is_cut_and_flipped_as_its_image(edits):
    """A condition image identical to its target comes out identical under random crop and flip; another file
    comes out as that file (the row's own input)."""
    (edits / "same.png").write_bytes((edits / "target0.png").read_bytes())
    (edits / "meta.csv").write_text("image,prompt,edit_image\ntarget0.png,make it red,same.png\n"
                                    "target1.png,make it blue,input1.png\n")
    built = build(edits, caption_file="meta.csv", condition_column="edit_image", crop="random", random_flip=True)
    assert sorted(item.key for item in built.dataset.items) == ["s1/target0.png", "s1/target1.png"]  # inputs are not targets
    by_key = {item.key: i for i, item in enumerate(built.dataset.items)}
    flips = set()
    for draw in range(8):  # random windows and flips differ between draws, the pair never does
        sample = built.dataset[(by_key["s1/target0.png"], draw)]
        assert torch.equal(sample["condition_pixels"], sample["pixel_values"][None])  # [K = 1, 3, H, W]
        flips.add(sample["pixel_values"][:, :, 0].sum().item())
    assert len(flips) > 1
    other = built.dataset[(by_key["s1/target1.png"], 0)]
    assert other["condition_pixels"].shape == (1, *other["pixel_values"].shape)
    assert not torch.equal(other["condition_pixels"][0], other["pixel_values"])
    assert other["prompt"] == "make it blue"


def test_rows_without_a_usable_condition_image_are_skipped_with_one_warning(edits, caplog):
    records = [{"image": "target0.png", "prompt": "a", "edit_image": "input0.png"},
               {"image": "target1.png", "prompt": "b", "edit_image": "gone.png"}]
    (edits / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with caplog.at_level(logging.WARNING):
        built = build(edits, caption_file="meta.jsonl", condition_column="edit_image")
    assert [item.key for item in built.dataset.items] == ["s1/target0.png"]
    (warning,) = [r.getMessage() for r in caplog.records if "condition image" in r.getMessage()]
    assert "target1.png: gone.png does not exist" in warning


def test_no_usable_condition_image_at_all_is_one_error(edits):
    (edits / "meta.csv").write_text("image,prompt,edit_image\ntarget0.png,a,missing.png\n")
    with pytest.raises(DataError, match=r"data.dataset1.source.s1.condition_column: no image .* usable 'edit_image'"):
        build(edits, caption_file="meta.csv", condition_column="edit_image")


def test_a_table_without_the_column_names_condition_column(edits):
    (edits / "meta.csv").write_text("image,prompt\ntarget0.png,a\n")
    with pytest.raises(DataError, match="image_column / condition_column ask for 'file_name|image,edit_image'"):
        build(edits, caption_file="meta.csv", condition_column="edit_image")


def test_condition_column_needs_a_metadata_table(edits):
    with pytest.raises(ConfigError, match="condition_column: condition images are named in a metadata table"):
        build(edits, condition_column="edit_image")


def test_latent_cache_is_off_with_condition_images(edits, caplog):
    """The latent cache would serve latents without their condition images: it is turned off with one warning."""
    from hcpdiff.data.builders import DatasetSpec, SourceSpec, _latent_cache_allowed

    spec = DatasetSpec(source={}, bucket={}, cache_latents=True)
    with caplog.at_level(logging.WARNING):
        assert not _latent_cache_allowed(spec, {"s1": SourceSpec(img_root=str(edits), condition_column="e")},
                                         "data.dataset1")
    assert "cache_latents is off: data.dataset1.source.s1 has condition images" in caplog.text


def test_several_condition_images_per_row_in_json_lists_and_csv_cells(edits):
    """A row may name several input images (a json / jsonl list, a JSON list in a csv cell), each cut as its image;
    rows with more than the model takes are skipped with the warning, and a batch needs as many per sample."""
    (edits / "same.png").write_bytes((edits / "target0.png").read_bytes())
    records = [{"image": "target0.png", "prompt": "a", "edit_image": ["same.png", "input0.png"]},
               {"image": "target1.png", "prompt": "b", "edit_image": "input1.png"}]
    (edits / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    node = {"batch_size": 1, "source": {"s1": {"img_root": str(edits), "caption_file": "meta.jsonl",
                                               "condition_column": "edit_image", "crop": "random"}}, "bucket": BUCKET}
    built = build_dataset(node, "data.dataset1", pixel_step=16, seed=0, max_conditions=3)
    by_key = {item.key: i for i, item in enumerate(built.dataset.items)}
    two = built.dataset[(by_key["s1/target0.png"], 0)]
    assert two["condition_pixels"].shape[0] == 2 and torch.equal(two["condition_pixels"][0], two["pixel_values"])
    assert built.dataset[(by_key["s1/target1.png"], 0)]["condition_pixels"].shape[0] == 1
    with pytest.raises(ConfigError, match="data.dataset1.batch_size: rows have 1 to 2 input images"):
        build_dataset({**node, "batch_size": 2}, "data.dataset1", pixel_step=16, seed=0, max_conditions=3)
    built = build_dataset(node, "data.dataset1", pixel_step=16, seed=0, max_conditions=1)
    assert [item.key for item in built.dataset.items] == ["s1/target1.png"]  # two images: more than the model takes

    (edits / "meta.csv").write_text('image,prompt,edit_image\ntarget0.png,a,"[""input0.png"", ""input1.png""]"\n')
    built = build(edits, caption_file="meta.csv", condition_column="edit_image")
    assert built.dataset.items[0].condition == (str(edits / "input0.png"), str(edits / "input1.png"))


def test_the_trainers_uint8_condition_images_are_the_same_pixels_and_pictures(edits):
    """The trainer's dataset (uint8_pixels) hands input images over as bytes, a quarter of the floats; they convert
    to the same floats on the device and to the same PIL images an editing conditioner gives its pipeline."""
    from hcpdiff.data.images import unit_range
    from hcpdiff.families.base import batch_condition_images

    (edits / "meta.csv").write_text("image,prompt,edit_image\ntarget0.png,a,input0.png\ntarget1.png,b,input1.png\n")
    floats = build(edits, caption_file="meta.csv", condition_column="edit_image", random_flip=True)
    uint8 = build(edits, uint8_pixels=True, caption_file="meta.csv", condition_column="edit_image", random_flip=True)
    for index in range(2):
        ours, theirs = uint8.dataset[(index, 3)]["condition_pixels"], floats.dataset[(index, 3)]["condition_pixels"]
        assert ours.dtype == torch.uint8 and torch.equal(unit_range(ours), theirs)
        pictures = batch_condition_images({"condition_pixels": ours[None]})[0]
        assert [picture.tobytes() for picture in pictures] == \
            [picture.tobytes() for picture in batch_condition_images({"condition_pixels": theirs[None]})[0]]
