"""load_model_parts: local folders, the hub cache, and quick clear errors when a model cannot be had."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.models import ModelParts, load_model_parts


def test_loads_every_part_of_a_local_folder(tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = load_model_parts(str(tiny_model_dir))
    assert parts.family.name == "sd"
    assert parts.name_or_path == str(tiny_model_dir)
    assert isinstance(parts.unet, UNet2DConditionModel)
    assert isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.text_encoder, CLIPTextModel)
    assert isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert parts.noise_scheduler.config.num_train_timesteps == 1000
    assert parts.vae_scale_factor == 8
    assert parts.pixel_step == 16


def test_pixel_step_of_an_sd_shaped_model() -> None:
    parts = ModelParts(
        family=family_named("sd"),
        components={"unet": SimpleNamespace(config={"block_out_channels": (320, 640, 1280, 1280)}),
                    "vae": SimpleNamespace(config={"block_out_channels": (128, 256, 512, 512)})},
        noise_scheduler=None, name_or_path="sd15",
    )
    assert (parts.vae_scale_factor, parts.pixel_step) == (8, 64)


@pytest.mark.parametrize("path", ["/no/such/model", "./no_such_model", "~/no_such_model", "a/b/c", "model.safetensors"])
def test_missing_local_path_is_a_model_error(path: str) -> None:
    with pytest.raises(ModelError, match="was not found"):
        load_model_parts(path)


def test_folder_without_a_part_names_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match=r"'.*broken' has no unet/"):
        load_model_parts(str(broken))


def test_single_file_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="single checkpoint file"):
        load_model_parts(str(checkpoint))


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, with HF_HUB_OFFLINE unset."""
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_uncached_hub_id_fails_fast_without_retries(empty_hub_cache: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ModelError, match="hcpdiff-tests/no-such-model"):
        load_model_parts("hcpdiff-tests/no-such-model")
    assert time.monotonic() - started < 5


def test_unreachable_hub_message(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hcpdiff.models.loading.hub_reachable", lambda: False)
    with pytest.raises(ModelError) as caught:
        load_model_parts("runwayml/stable-diffusion-v1-5")
    assert str(caught.value) == (
        "model.pretrained_model_name_or_path: 'runwayml/stable-diffusion-v1-5' is not a local folder nor in the "
        "Hugging Face cache, and the hub cannot be reached from this machine."
    )


def test_offline_mode_refuses_without_probing(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hcpdiff.models.loading.hub_reachable", lambda: pytest.fail("probed the hub offline"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1"):
        load_model_parts("runwayml/stable-diffusion-v1-5")


def test_hub_id_in_the_cache_loads_offline(empty_hub_cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = empty_hub_cache / "models--hcpdiff-tests--tiny-sd"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("hcpdiff.models.loading.hub_reachable", lambda: pytest.fail("probed the hub for a cached model"))
    parts = load_model_parts("hcpdiff-tests/tiny-sd")
    assert parts.name_or_path == "hcpdiff-tests/tiny-sd"
    assert parts.pixel_step == 16
