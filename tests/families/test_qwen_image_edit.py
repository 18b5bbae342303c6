"""Qwen-Image-Edit as a family: detection and its VL processor, the conditioner and denoise against what
QwenImageEditPipeline itself feeds its transformer (recorded from a real call), a batch of two edits training as its
samples one by one, the one-line refusals of a run or render without input images (or with them for a family that
takes none), and one run of the shipped config whose loss falls and whose LoRA the visualizer renders as
QwenImageEditPipeline.load_lora_weights renders the --to_diffusers file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from family_data import (CPU, REPO_ROOT, as_pixels, batch_and_alone_edits, edit_overfit_args, logged_losses,
                         random_image, to_diffusers, train_in, transformer_calls, visualizer_output)
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.qwen_image import pack_latents, unpack_latents
from hcpdiff.families.qwen_image_edit import load_vl_processor
from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_demo_data import make_demo_data

EDIT = family_named("qwen_image_edit")
STEPS = 30


@pytest.fixture(scope="module")
def tiny_edit(tiny_models) -> Path:
    return tiny_models("qwen_image_edit")


@pytest.fixture(scope="module")
def parts(tiny_edit):
    return load_model_parts(str(tiny_edit))


def test_tiny_model_is_detected_with_its_processor_and_the_pipelines_drop_index(tiny_edit, parts):
    index = json.loads((tiny_edit / "model_index.json").read_text())
    assert detect_family(index, folder_config_reader(tiny_edit), str(tiny_edit), "test") is EDIT
    assert parts.family is EDIT and parts.pixel_step == 16
    processor = parts.components["processor"]
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    pipe = EDIT.build_pipeline(parts.components, parts.noise_scheduler)
    assert isinstance(pipe, QwenImageEditPipeline)
    # the edit template's system prefix is exactly the pipeline's drop index, as with the real tokenizer
    prefix = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


def test_conditioner_and_denoise_are_what_the_pipeline_feeds_its_transformer(parts):
    """The input image given as a dataset gives it (cut to its bucket, in [-1, 1]): the conditioner's prompt states
    (with the image's vision tokens) and input-image tokens, and denoise's prediction, equal those of a real
    QwenImageEditPipeline call on that image."""
    pipe = EDIT.build_pipeline(parts.components, parts.noise_scheduler)
    image = random_image(48, 32, seed=1)
    # the transformer's first call (two steps: with one, the scheduler's terminal stretch divides by zero)
    seen = transformer_calls(pipe, image=image, prompt="make it red", height=64, width=48, true_cfg_scale=1.0)[0]
    kwargs = seen["kwargs"]
    conditioning = EDIT.build_conditioner(parts.components, 1, 0)(["make it red"],
                                                                   {"condition_pixels": as_pixels(image)[None, None]}, CPU)
    assert torch.equal(conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    assert kwargs["encoder_hidden_states_mask"] is None  # one prompt: the pipeline drops an all-ones mask
    assert conditioning["encoder_hidden_states_mask"].all()
    noisy_tokens = 64 // 16 * 48 // 16
    assert torch.equal(conditioning["condition_latents"], kwargs["hidden_states"][:, noisy_tokens:].float())
    ((height, width),) = conditioning["condition_sizes"]
    assert kwargs["img_shapes"] == [[(1, 4, 3), (1, height // 2, width // 2)]]
    assert (width * 8, height * 8) == (1248, 832)  # the pipeline's 1024x1024 area at 3:2

    noisy = unpack_latents(kwargs["hidden_states"][:, :noisy_tokens], 8, 6)
    sigma = kwargs["timestep"]
    prediction = EDIT.denoise(parts.transformer, noisy, sigma, conditioning)
    assert torch.allclose(pack_latents(prediction), seen["output"][:, :noisy_tokens], atol=1e-5)


def test_a_batch_of_two_edits_trains_as_its_samples_one_by_one(parts):
    """Prompts of different lengths with different input images, batched (states padded, mask), predict per sample
    what each predicts alone."""
    conditioner = EDIT.build_conditioner(parts.components, 1, 0, condition_area=64 * 64)
    prompts = ["make it red", "make the circle a blue square photo with the original background"]
    images = torch.stack([as_pixels(random_image(32, 32, seed)) for seed in (2, 3)])[:, None]  # [B, K = 1, 3, H, W]
    batched, together, alone = batch_and_alone_edits(EDIT, parts.transformer, conditioner, prompts, images)
    assert not batched["encoder_hidden_states_mask"].all()  # padded: the prompts differ in length
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.fixture
def edit_run(tmp_path, tiny_edit):
    """A work folder with cfgs/ and an editing dataset, and the training arguments every refusal below shares."""
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(tmp_path / "data", num=1, captions="edit")
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_qwen_image_edit.yaml",
            f"model.pretrained_model_name_or_path={tiny_edit}", f"data.dataset1.source.data_source1.img_root={data}",
            "mixed_precision=null", "train.train_steps=1"]
    return tmp_path, data, args


@pytest.mark.parametrize("override, key", [
    ("data.dataset1.source.data_source1.condition_column=null", "data.dataset1.source.data_source1.condition_column"),
    ("previewer={step: 1, prompts: [x]}", "previewer.condition_images"),
    ("previewer={step: 1, prompts: [x], condition_images: [gone.png]}", "previewer.condition_images"),
])
def test_an_edit_run_without_its_input_images_is_one_line(edit_run, cli_in_process, one_error_line, override, key):
    workdir, _, args = edit_run
    line = one_error_line(cli_in_process([*args, override], cwd=workdir))
    assert line.startswith(f"error: {key}:"), line
    assert not (workdir / "exps").exists() or not any((workdir / "exps").iterdir())


def test_input_images_for_a_family_that_takes_none_are_one_line(edit_run, cli_in_process, one_error_line, tiny_model):
    workdir, data, _ = edit_run
    line = one_error_line(cli_in_process([
        "-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
        f"model.pretrained_model_name_or_path={tiny_model}", f"data.dataset1.source.data_source1.img_root={data}",
        "data.dataset1.source.data_source1.caption_file=metadata.csv",
        "data.dataset1.source.data_source1.condition_column=edit_image"], cwd=workdir))
    assert line.startswith("error: data.dataset1.source.data_source1.condition_column: a Stable Diffusion"), line
    line = one_error_line(cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml",
                                          f"pretrained_model={tiny_model}", "prompt=x",
                                          f"condition_image={data}/input/0.png"], cwd=workdir))
    assert line.startswith("error: condition_image: a Stable Diffusion"), line


def test_a_render_without_its_input_image_is_one_line(edit_run, cli_in_process, one_error_line, tiny_edit):
    workdir, data, _ = edit_run
    base = ["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/edit_qwen_image.yaml", f"pretrained_model={tiny_edit}",
            "prompt=[a, b, c]"]
    assert one_error_line(cli_in_process(base, cwd=workdir)).startswith("error: condition_image: a Qwen-Image-Edit")
    two = f"condition_image=[{data}/input/0.png,{data}/0.png]"
    assert "one per prompt (3), not 2" in one_error_line(cli_in_process([*base, two], cwd=workdir))
    assert "'gone.png' does not exist" in one_error_line(cli_in_process([*base, "condition_image=gone.png"],
                                                                        cwd=workdir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_edit, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, data) of lora_qwen_image_edit.yaml overfitting one edit for STEPS steps on the tiny
    model (fp32 on the CPU, rank 4, input images at a 64x64 area to keep it quick), with an edit preview."""
    workdir = tmp_path_factory.mktemp("qwen_edit_run")
    config = "cfgs/train/examples/lora_qwen_image_edit.yaml"
    exp, _ = train_in(workdir, cli_in_process, lambda data: edit_overfit_args(config, tiny_edit, data, STEPS),
                      captions="edit")
    return tiny_edit, exp, workdir / "data"


@pytest.mark.e2e
def test_shipped_config_overfits_one_edit_and_previews_it(trained):
    _, exp, _ = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, (first, last)
    assert Image.open(exp / "preview" / f"{STEPS}-0.png").size == (64, 64)
    matched = json.loads((exp / "lora_layers.json").read_text())["lora_transformer"][0]["layers"]
    assert "transformer_blocks.0.attn.add_q_proj" in matched  # the first block's text stream trains,
    assert "transformer_blocks.1.attn.add_q_proj" not in matched  # the last one's (discarded) is left out


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, data = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    image_file = visualizer_output(cli_in_process, tmp_path, "cfgs/infer/edit_qwen_image.yaml", model, lora,
                                   f"condition_image={data}/input/0.png", "infer_args.guidance_scale=1",
                                   prompt="make the circle red")
    assert json.loads(Image.open(image_file).info["hcpdiff"])["condition_image"] == f"{data}/input/0.png"
    rendered = np.asarray(Image.open(image_file).convert("RGB"), dtype=np.int16)

    converted = to_diffusers(lora, tmp_path / "pytorch_lora_weights.safetensors")
    # QwenImageEditPipeline's own loader, given the VL processor it cannot build without torchvision
    pipe = QwenImageEditPipeline.from_pretrained(model, processor=load_vl_processor(str(model), {}))
    pipe.load_lora_weights(str(converted))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(image=Image.open(data / "input" / "0.png").convert("RGB"), prompt="make the circle red",
                     negative_prompt=" ", true_cfg_scale=1.0, height=64, width=64, num_inference_steps=2,
                     generator=torch.Generator("cpu").manual_seed(42), output_type="pil").images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - rendered).max() <= 1
