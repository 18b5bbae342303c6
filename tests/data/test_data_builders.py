"""build_dataset: a config node in, a dataset + batch sampler out; user mistakes become one clear error."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from hcpdiff.data import BuiltDataset, FixedBucket, RatioBucket, build_dataset
from hcpdiff.errors import ConfigError, DataError

from data_helpers import write_image

KEY = "data.dataset1"
RATIO_BUCKET = {"_target_": "hcpdiff.data.RatioBucket.from_files", "_partial_": True, "target_area": 64 * 64, "num_bucket": 3}


def dataset_node(img_root, **source_fields) -> dict:
    source = {"img_root": None if img_root is None else str(img_root), **source_fields}
    return {"batch_size": 2, "source": {"data_source1": source}, "bucket": RATIO_BUCKET}


def build(node, pixel_step: int = 32, **kwargs) -> BuiltDataset:
    return build_dataset(node, KEY, pixel_step=pixel_step, seed=0, **kwargs)


def test_builds_dataset_from_config(image_folder):
    (image_folder / "captions.json").write_text(json.dumps({"wide": "a {pt1}", "tall.jpg": "standing"}))
    node = dataset_node(image_folder, caption_file=str(image_folder), word_names={"pt1": "pt-cat1"}, repeat=2)
    built = build(OmegaConf.create(node))
    assert built.num_images == 6 and len(built.dataset) == 12
    assert built.batch_size == 2 and built.loss_weight == 1.0
    assert isinstance(built.bucket, RatioBucket)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in built.bucket.sizes)
    prompts = {item.key: built.dataset[i]["prompt"] for i, item in enumerate(built.dataset.items)}
    assert prompts["data_source1/wide.png"] == "a pt-cat1" and prompts["data_source1/tall.jpg"] == "standing"
    for batch in built.batch_sampler:
        assert len({built.dataset.bucket_ids[i] for i in batch}) == 1
    assert built.describe()[0].startswith("6 images, 12 items")


def test_step_size_defaults_to_pixel_step_but_config_wins(image_folder):
    fixed = {"_target_": "hcpdiff.data.FixedBucket", "_partial_": True, "target_size": 128}
    built = build({**dataset_node(image_folder), "bucket": fixed}, pixel_step=64)
    assert isinstance(built.bucket, FixedBucket) and built.bucket.sizes == [(128, 128)]
    with pytest.raises(DataError, match="step 64"):
        build({**dataset_node(image_folder), "bucket": {**fixed, "target_size": 96, "step_size": 32}}, pixel_step=64)


def test_partial_flag_is_implied(image_folder):
    node = {**dataset_node(image_folder), "bucket": {"_target_": "hcpdiff.data.FixedBucket", "target_size": 64}}
    assert build(node).bucket.sizes == [(64, 64)]


def test_two_sources_share_one_bucket(image_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "wide.png", (130, 60))
    node = dataset_node(image_folder)
    node["source"]["data_source2"] = {"img_root": str(other), "prompt_template": None}
    built = build(node)
    assert built.num_images == 7
    assert "data_source2/wide.png" in built.bucket.bucket_of and "data_source1/wide.png" in built.bucket.bucket_of


def test_given_instantiate_is_used(image_folder):
    calls = []

    def instantiate(node, key_path):
        calls.append(key_path)
        return lambda **kwargs: FixedBucket(32, **kwargs)

    build(dataset_node(image_folder), instantiate=instantiate)
    assert calls == [f"{KEY}.bucket"]


def test_missing_img_root_names_key_and_path(tmp_path):
    with pytest.raises(DataError) as excinfo:
        build(dataset_node(tmp_path / "nowhere"))
    message = str(excinfo.value)
    assert f"{KEY}.source.data_source1.img_root" in message and "nowhere" in message


def test_img_root_without_images(tmp_path):
    with pytest.raises(DataError, match=r"img_root.*no readable images"):
        build(dataset_node(tmp_path))


def test_unknown_source_key_suggests_nearest(image_folder):
    node = dataset_node(image_folder)
    node["source"]["data_source1"]["img_rot"] = "x"
    with pytest.raises(ConfigError) as excinfo:
        build(node)
    assert f"{KEY}.source.data_source1.img_rot" in str(excinfo.value) and "'img_root'" in str(excinfo.value)


def test_key_problems_of_one_node_reported_together():
    node = {"batch_sise": 2, "source": {"s": {"img_rot": "x"}}, "bucket": RATIO_BUCKET}
    with pytest.raises(ConfigError, match=r"data\.dataset1\.batch_sise.*'batch_size'"):
        build(node)
    del node["batch_sise"]
    with pytest.raises(ConfigError, match=r"data\.dataset1\.source\.s\.img_rot.*'img_root'.*s\.img_root"):
        build(node)


def test_img_root_null_names_key(image_folder):
    with pytest.raises(DataError, match=r"data\.dataset1\.source\.data_source1\.img_root is not set"):
        build(dataset_node(None))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "batch_size"),
        ("batch_size", 2.5, "batch_size"),
        ("loss_weight", "heavy", "loss_weight"),
        ("bucket", None, "bucket"),
    ],
)
def test_bad_dataset_values(image_folder, field, value, message):
    with pytest.raises(ConfigError, match=message):
        build({**dataset_node(image_folder), field: value})


@pytest.mark.parametrize(
    "field, value",
    [("repeat", 0), ("repeat", "2"), ("bg_color", [255, 255]), ("bg_color", [0, 0, 300]), ("word_names", ["pt1"])],
)
def test_bad_source_values(image_folder, field, value):
    with pytest.raises(ConfigError, match=field):
        build(dataset_node(image_folder, **{field: value}))


def test_missing_captions_one_warning(image_folder, caplog):
    (image_folder / "wide.txt").write_text("wide thing")
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build(dataset_node(image_folder, caption_file=str(image_folder)))
    warnings = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"5 of 6 images in {image_folder} have no caption in {image_folder} (")
    assert "alpha.png, palette.png, rotated.JPG, ...); they train on the template alone." in warnings[0]
    assert len(built.dataset) == 6


def test_no_caption_file_no_warning(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        build(dataset_node(image_folder))
    assert not caplog.records


def test_unreadable_images_skipped_with_one_warning(image_folder, caplog):
    for name in ("bad1.png", "bad2.jpg", "bad3.webp", "bad4.bmp"):
        (image_folder / name).write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="hcpdiff.data"):
        built = build(dataset_node(image_folder))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"4 image(s) in {image_folder} cannot be read and are skipped (bad1.png: not an image; "
                        "bad2.jpg: not an image; bad3.webp: not an image; ...)."]
    assert built.num_images == 6


def test_caption_file_error_names_key(image_folder):
    with pytest.raises(DataError, match=rf"{KEY}\.source\.data_source1\.caption_file.*missing\.json"):
        build(dataset_node(image_folder, caption_file=str(image_folder / "missing.json")))


def test_bad_bucket_target_is_config_error(image_folder):
    node = {**dataset_node(image_folder), "bucket": {"_target_": "hcpdiff.data.NoSuchBucket"}}
    with pytest.raises(ConfigError, match=rf"{KEY}\.bucket"):
        build(node)


def test_bucket_argument_error_names_key(image_folder):
    node = {**dataset_node(image_folder), "bucket": {**RATIO_BUCKET, "num_bucket": 0}}
    with pytest.raises(DataError, match=rf"{KEY}\.bucket: RatioBucket num_bucket must be at least 1"):
        build(node)


def test_two_ranks_same_length(image_folder):
    lengths = [len(build(dataset_node(image_folder), num_replicas=2, rank=r).batch_sampler) for r in range(2)]
    assert lengths[0] == lengths[1]
