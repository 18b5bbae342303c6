"""make_tiny_model: a user builds a tiny SD1.x folder that diffusers and transformers load as a real one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.tools.make_tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model for this module."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def test_cli_writes_a_diffusers_folder(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "hcpdiff.tools.make_tiny_model", str(out), "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ):
        assert (out / name).is_file(), name


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    first, second, third = (load_file(folder / weights) for folder in (tiny_dir, again, other))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], third[key]) for key in first)


def test_parts_have_the_documented_shape(tiny_dir: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    scheduler = PNDMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    assert tuple(unet.config.block_out_channels) == (32, 64)
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 32
    assert tuple(vae.config.block_out_channels) == (8, 16, 16, 16)
    assert vae.config.latent_channels == 4
    assert text_encoder.config.vocab_size >= len(tokenizer)
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.skip_prk_steps and scheduler.config.steps_offset == 1
    assert scheduler.config.prediction_type == "epsilon"


def test_pipeline_renders_an_image(tiny_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_sd2_family_has_the_sd2_layout(tmp_path: Path, cli_in_process) -> None:
    """--family sd2: v-prediction DDIM scheduler, linear projections, per-level head widths, gelu CLIP."""
    import json

    out = tmp_path / "sd2"
    result = cli_in_process(["-m", "hcpdiff.tools.make_tiny_model", str(out), "--family", "sd2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scheduler = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "v_prediction"
    unet = json.loads((out / "unet/config.json").read_text())
    assert unet["use_linear_projection"] is True and unet["attention_head_dim"] == [4, 8]
    text = json.loads((out / "text_encoder/config.json").read_text())
    assert text["hidden_act"] == "gelu"
