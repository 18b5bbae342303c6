"""A base model given as one original-layout (a1111 / CompVis) .safetensors file, configs from a diffusers folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcpdiff.errors import ModelError
from hcpdiff.models import load_model_parts
from hcpdiff.tools.export_single_file import write_original_checkpoint


@pytest.fixture(scope="module")
def single_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights as one checkpoint in the original SD1.x key layout."""
    return write_original_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("single") / "tiny-a1111.safetensors")


def test_single_file_loads_the_same_weights(single_file: Path, tiny_model_dir: Path) -> None:
    from_file = load_model_parts(str(single_file), single_file_config=str(tiny_model_dir))
    from_folder = load_model_parts(str(tiny_model_dir))
    assert from_file.family.name == "sd" and from_file.name_or_path == str(single_file)
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(from_file, part).state_dict(), getattr(from_folder, part).state_dict()
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[key], want[key]) for key in want), part
    assert from_file.noise_scheduler.config.prediction_type == "epsilon"
    assert from_file.noise_scheduler.config.clip_sample is False
    assert from_file.tokenizer("a cat").input_ids == from_folder.tokenizer("a cat").input_ids


def test_single_file_without_config_offline_is_one_clear_error(single_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"single checkpoint file.*model\.single_file_config"):
        load_model_parts(str(single_file))


def test_single_file_config_must_be_a_diffusers_folder(single_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.single_file_config: '.*nothing' is not a local diffusers folder"):
        load_model_parts(str(single_file), single_file_config=str(tmp_path / "nothing"))
