"""Qwen-Image-Edit-2509 / 2511 as a family: detection apart from Qwen-Image-Edit, the conditioner and denoise with two
input images against what QwenImageEditPlusPipeline feeds its transformer (recorded from a real call), a batch of two
samples with two input images each training as its samples one by one, and the visualizer rendering with a list of
input images per prompt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from family_data import CPU, REPO_ROOT, as_pixels, batch_and_alone_edits, random_image, transformer_calls
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.qwen_image import pack_latents, unpack_latents
from hcpdiff.models import load_model_parts

PLUS = family_named("qwen_image_edit_plus")


@pytest.fixture(scope="module")
def tiny_plus(tiny_models) -> Path:
    return tiny_models("qwen_image_edit_plus")


@pytest.fixture(scope="module")
def parts(tiny_plus):
    return load_model_parts(str(tiny_plus))


def sample_pixels(images: list[Image.Image]) -> torch.Tensor:
    """A sample's input images as a dataset gives them: [K, 3, H, W] in [-1, 1]."""
    return torch.stack([as_pixels(image) for image in images])


def test_detected_apart_from_qwen_image_edit(tiny_plus, parts):
    index = json.loads((tiny_plus / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert detect_family(index, folder_config_reader(tiny_plus), str(tiny_plus), "test") is PLUS
    assert not family_named("qwen_image_edit").matches(index, folder_config_reader(tiny_plus))
    assert parts.family is PLUS and PLUS.condition_images == 3


def test_conditioner_and_denoise_are_what_the_pipeline_feeds_its_transformer(parts):
    pipe = PLUS.build_pipeline(parts.components, parts.noise_scheduler)
    images = [random_image(48, 32, seed) for seed in (1, 2)]
    # the first call of two steps (with one, the scheduler's terminal stretch divides by zero)
    seen = transformer_calls(pipe, image=images, prompt="put picture 2 on picture 1", height=64, width=48,
                             true_cfg_scale=1.0)[0]
    kwargs = seen["kwargs"]
    conditioning = PLUS.build_conditioner(parts.components, 1, 0)(
        ["put picture 2 on picture 1"], {"condition_pixels": sample_pixels(images)[None]}, CPU)
    assert torch.equal(conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    noisy_tokens = 4 * 3
    assert torch.equal(conditioning["condition_latents"], kwargs["hidden_states"][:, noisy_tokens:].float())
    assert kwargs["img_shapes"] == [[(1, 4, 3), *((1, h // 2, w // 2) for h, w in conditioning["condition_sizes"])]]
    assert len(conditioning["condition_sizes"]) == 2
    prediction = PLUS.denoise(parts.transformer, unpack_latents(kwargs["hidden_states"][:, :noisy_tokens], 8, 6),
                              kwargs["timestep"], conditioning)
    assert torch.allclose(pack_latents(prediction), seen["output"][:, :noisy_tokens], atol=1e-5)


def test_a_batch_of_two_samples_with_two_input_images_trains_as_its_samples(parts):
    conditioner = PLUS.build_conditioner(parts.components, 1, 0, condition_area=64 * 64)
    prompts = ["put picture 2 on picture 1", "make the circle of picture 1 the color of the square in picture 2"]
    pixels = torch.stack([sample_pixels([random_image(32, 32, seed), random_image(32, 32, seed + 10)])
                          for seed in (3, 4)])  # [B, K, 3, H, W]
    batched, together, alone = batch_and_alone_edits(PLUS, parts.transformer, conditioner, prompts, pixels)
    assert not batched["encoder_hidden_states_mask"].all()
    assert torch.allclose(together, alone, atol=1e-5)


def test_visualizer_renders_with_a_list_of_input_images(tiny_plus, tmp_path, cli_in_process, one_error_line):
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    for seed in (5, 6):
        random_image(48, 32, seed).save(tmp_path / f"in{seed}.png")
    base = ["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/edit_qwen_image_plus.yaml", f"pretrained_model={tiny_plus}",
            "prompt='put picture 2 on picture 1'", "dtype=fp32", "infer_args.width=48", "infer_args.height=32",
            "infer_args.num_inference_steps=2", "infer_args.guidance_scale=1", f"save.out_dir={tmp_path / 'out'}"]
    done = cli_in_process([*base, "condition_image=[[in5.png, in6.png]]"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (image,) = sorted((tmp_path / "out").glob("*.png"))
    assert Image.open(image).size == (48, 32)
    four = "condition_image=[[in5.png, in6.png, in5.png, in6.png]]"
    assert "takes 1 to 3 input image(s) per prompt, not 4" in one_error_line(cli_in_process([*base, four],
                                                                                             cwd=tmp_path))
