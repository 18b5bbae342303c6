"""SDXL: family detection, both text encoders loaded, conditioning equal to diffusers' own encode_prompt."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcpdiff.models import SDConditioner, build_conditioner, load_model_parts
from hcpdiff.models.sdxl import SDXLConditioner


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl: Path):
    return load_model_parts(str(tiny_sdxl))


def test_sdxl_folder_loads_as_family_sdxl_with_both_encoders(sdxl_parts) -> None:
    from transformers import CLIPTextModelWithProjection

    assert sdxl_parts.family.name == "sdxl"
    assert isinstance(sdxl_parts.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl_parts.tokenizer_2 is not None
    assert isinstance(build_conditioner(sdxl_parts), SDXLConditioner)


def test_sd_folder_stays_family_sd(tiny_model_dir: Path) -> None:
    parts = load_model_parts(str(tiny_model_dir))
    assert parts.family.name == "sd" and parts.text_encoder_2 is None and parts.tokenizer_2 is None
    assert isinstance(build_conditioner(parts), SDConditioner)


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sdxl_conditioning_equals_diffusers_encode_prompt(tiny_sdxl: Path, sdxl_parts, clip_skip: int) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    want_embeds, _, want_pooled, _ = pipeline.encode_prompt(
        prompts, device=torch.device("cpu"), do_classifier_free_guidance=False, clip_skip=clip_skip or None)
    conditioner = build_conditioner(sdxl_parts, clip_skip=clip_skip)
    batch = {
        "pixel_values": torch.zeros(2, 3, 64, 128),
        "original_size": torch.tensor([[100, 200], [64, 128]]),
        "crop_top_left": torch.tensor([[3, 0], [0, 0]]),
    }
    with torch.no_grad():
        kwargs = conditioner(prompts, batch, torch.device("cpu"))
    torch.testing.assert_close(kwargs["encoder_hidden_states"], want_embeds)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], want_pooled)
    want_time_ids = pipeline._get_add_time_ids((100, 200), (3, 0), (64, 128), dtype=torch.float32,
                                                text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"][0], want_time_ids[0])
    assert kwargs["added_cond_kwargs"]["time_ids"][1].tolist() == [64, 128, 0, 0, 64, 128]


def test_sdxl_conditioning_drives_the_unet(sdxl_parts) -> None:
    conditioner = build_conditioner(sdxl_parts)
    batch = {"latents": torch.zeros(1, 4, 8, 8)}  # cached latents: no sizes, taken as an uncropped 64 px image
    with torch.no_grad():
        kwargs = conditioner(["a cat"], batch, torch.device("cpu"))
        assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
        out = sdxl_parts.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), **kwargs).sample
    assert out.shape == (1, 4, 8, 8)
