"""FLUX.1 Kontext as a family: detection (FLUX.1 and Kontext folders told apart), the conditioner and denoise against
what FluxKontextPipeline itself feeds its transformer (recorded from a real call), the training shift on the noisy
latents' sequence only (as the pipeline's), and one run of the shipped config whose loss falls, whose LoRA the
visualizer renders as FluxKontextPipeline.load_lora_weights renders the --to_diffusers file, and whose kohya file
(FLUX.1's layout) reads back with the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from family_data import (CPU, as_pixels, batch_and_alone_edits, edit_overfit_args, logged_losses, random_image,
                         to_diffusers, train_in, transformer_calls, visualizer_output)
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.flux import pack_latents, unpack_latents
from hcpdiff.families.flux_kontext import kontext_size
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import resolution_mu

KONTEXT = family_named("flux_kontext")
STEPS = 20


@pytest.fixture(scope="module")
def tiny_kontext(tiny_models) -> Path:
    return tiny_models("flux_kontext")


@pytest.fixture(scope="module")
def parts(tiny_kontext):
    return load_model_parts(str(tiny_kontext))


def test_tiny_model_is_kontext_and_flux_folders_are_told_apart(tiny_kontext, parts):
    index = json.loads((tiny_kontext / "model_index.json").read_text())
    read_config = folder_config_reader(tiny_kontext)
    assert detect_family(index, read_config, str(tiny_kontext), "test") is KONTEXT
    assert parts.family is KONTEXT and parts.pixel_step == 16
    # the transformer config is FLUX.1-dev's: only the pipeline class tells them apart, both ways
    assert not family_named("flux").matches(index, read_config)
    assert not KONTEXT.matches({"_class_name": "FluxPipeline"}, read_config)
    assert not KONTEXT.matches({}, read_config) and family_named("flux").matches({}, read_config)
    assert isinstance(KONTEXT.build_pipeline(parts.components, parts.noise_scheduler), FluxKontextPipeline)


def test_conditioner_denoise_and_shift_are_what_the_pipeline_feeds_its_transformer(parts):
    """The input image given as a dataset gives it (cut to its bucket, in [-1, 1]): the conditioner's text states and
    input-image tokens and ids, denoise's prediction, and the objective's shifted sigma equal those of a real
    FluxKontextPipeline call on that image (auto-resized to its preferred 1248 x 832 for 3:2)."""
    pipe = KONTEXT.build_pipeline(parts.components, parts.noise_scheduler)
    image = random_image(48, 32, seed=1)
    first, second = transformer_calls(pipe, image=image, prompt="make it red", height=64, width=48, max_area=64 * 48,
                                      guidance_scale=2.5)
    kwargs = first["kwargs"]
    conditioner = KONTEXT.build_conditioner(parts.components, 1, 0, guidance=2.5)
    with torch.no_grad():  # as the pipeline runs (T5 takes another kernel path with autograd on)
        conditioning = conditioner(["make it red"], {"condition_pixels": as_pixels(image)[None, None]}, CPU)
    for key in ("encoder_hidden_states", "pooled_projections", "guidance"):
        assert torch.equal(conditioning[key], kwargs[key]), key
    noisy_tokens = 64 // 16 * 48 // 16
    assert conditioning["condition_latents"].shape[1] == 1248 // 16 * 832 // 16
    assert torch.equal(conditioning["condition_latents"], kwargs["hidden_states"][:, noisy_tokens:])
    assert torch.equal(conditioning["condition_ids"], kwargs["img_ids"][noisy_tokens:])
    assert (conditioning["condition_ids"][:, 0] == 1).all() and (kwargs["img_ids"][:noisy_tokens, 0] == 0).all()

    noisy = unpack_latents(kwargs["hidden_states"][:, :noisy_tokens], 8, 6)
    prediction = KONTEXT.denoise(parts.transformer, noisy, kwargs["timestep"], conditioning)
    assert torch.allclose(pack_latents(prediction)[0], first["output"][:, :noisy_tokens], atol=1e-5)

    # the second step's sigma (0.5 unshifted) is shifted for the noisy tokens alone, as training shifts it
    scheduler = parts.noise_scheduler
    shifted = scheduler.time_shift(resolution_mu(scheduler.config, noisy_tokens), 1.0, torch.tensor(0.5))
    assert torch.allclose(second["kwargs"]["timestep"], shifted.float().expand(1), atol=1e-6)


def test_condition_area_keeps_the_preferred_resolutions_aspect_ratio():
    assert kontext_size(random_image(48, 32, 0), 16) == (1248, 832)
    assert kontext_size(random_image(32, 32, 0), 16) == (1024, 1024)
    assert kontext_size(random_image(32, 32, 0), 16, area=64 * 64) == (64, 64)
    assert kontext_size(random_image(48, 32, 0), 16, area=128 * 128) == (144, 96)  # 1248 x 832 scaled, in 16s


def test_a_batch_of_two_edits_trains_as_its_samples_one_by_one(parts):
    conditioner = KONTEXT.build_conditioner(parts.components, 1, 0, condition_area=64 * 64)
    prompts = ["make it red", "make the circle a blue square photo with the original background"]
    images = torch.stack([as_pixels(random_image(32, 32, seed)) for seed in (2, 3)])[:, None]  # [B, K = 1, 3, H, W]
    _, together, alone = batch_and_alone_edits(KONTEXT, parts.transformer, conditioner, prompts, images)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_kontext, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, data) of lora_flux_kontext.yaml overfitting one edit for STEPS steps on the tiny
    model (fp32 on the CPU, rank 4, input images at a 64x64 area to keep it quick), with an edit preview."""
    workdir = tmp_path_factory.mktemp("flux_kontext_run")
    config = "cfgs/train/examples/lora_flux_kontext.yaml"
    exp, _ = train_in(workdir, cli_in_process, lambda data: edit_overfit_args(config, tiny_kontext, data, STEPS),
                      captions="edit")
    return tiny_kontext, exp, workdir / "data"


@pytest.mark.e2e
def test_shipped_config_overfits_one_edit_and_previews_it(trained):
    _, exp, _ = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, (first, last)
    assert Image.open(exp / "preview" / f"{STEPS}-0.png").size == (64, 64)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, data = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    image_file = visualizer_output(cli_in_process, tmp_path, "cfgs/infer/edit_flux_kontext.yaml", model, lora,
                                   f"condition_image={data}/input/0.png", prompt="make the circle red", height=48)
    assert json.loads(Image.open(image_file).info["hcpdiff"])["condition_image"] == f"{data}/input/0.png"
    rendered = np.asarray(Image.open(image_file).convert("RGB"), dtype=np.int16)
    assert rendered.shape == (48, 64, 3)  # the requested size, not the pipeline's default megapixel

    converted = to_diffusers(lora, tmp_path / "pytorch_lora_weights.safetensors")
    pipe = FluxKontextPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(converted))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(image=Image.open(data / "input" / "0.png").convert("RGB"), prompt="make the circle red",
                     height=48, width=64, max_area=64 * 48, num_inference_steps=2, guidance_scale=2.5,
                     generator=torch.Generator("cpu").manual_seed(42), output_type="pil").images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - rendered).max() <= 1


@pytest.mark.e2e
def test_kohya_file_is_flux_layout_and_reads_back_with_the_same_weights(trained, tmp_path):
    """--to_webui writes FLUX.1's kohya layout (the transformer is FLUX.1's; ComfyUI loads it into Kontext), and
    --from_webui reads it back (as a FLUX.1 file: the names cannot tell) merging into the same transformer weights."""
    from hcpdiff.lora.merge import merge_lora
    from hcpdiff.lora.state_io import load_lora
    from hcpdiff.tools.lora_convert import main as lora_convert

    model, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    webui = tmp_path / "kontext-lora.safetensors"
    assert lora_convert(["--to_webui", "--lora_path", str(lora), "--dump_path", str(webui)]) == 0
    keys = {key.split(".")[0] for key in load_file(webui)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"} <= keys
    assert lora_convert(["--from_webui", "--lora_path", str(webui), "--dump_path", str(tmp_path / "back")]) == 0
    merged = []
    for path in (lora, tmp_path / "back" / "transformer-kontext-lora.safetensors"):
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
        merge_lora(transformer, load_lora(path)[0], 1.0, source=str(path))
        merged.append(transformer.state_dict())
    assert all(torch.allclose(merged[0][key], merged[1][key], atol=1e-6) for key in merged[0])
