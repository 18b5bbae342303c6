"""FLUX.1 Kontext as a family: detection (FLUX.1 and Kontext folders told apart), the conditioner and denoise against
what FluxKontextPipeline itself feeds its transformer (recorded from a real call), the training shift on the noisy
latents' sequence only (as the pipeline's), and one run of the shipped config whose loss falls, whose LoRA the
visualizer renders as FluxKontextPipeline.load_lora_weights renders the --to_diffusers file, and whose kohya file
(FLUX.1's layout) reads back with the same weights."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.flux import pack_latents, unpack_latents
from hcpdiff.families.flux_kontext import kontext_size
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import resolution_mu
from hcpdiff.tools.make_demo_data import make_demo_data

KONTEXT = family_named("flux_kontext")
REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
STEPS = 20


@pytest.fixture(scope="module")
def tiny_kontext(tiny_models) -> Path:
    return tiny_models("flux_kontext")


@pytest.fixture(scope="module")
def parts(tiny_kontext):
    return load_model_parts(str(tiny_kontext))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def as_pixels(image: Image.Image) -> torch.Tensor:
    """What a dataset gives for an image: [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


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


def record_transformer_calls(pipe: FluxKontextPipeline, image: Image.Image, prompt: str) -> list[dict]:
    """The keyword arguments and output of each transformer call in a real 2-step pipeline run at 48 x 64."""
    seen = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        seen.append({"kwargs": kwargs, "output": output[0]})
        return output

    pipe.transformer.forward = recording
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipe(image=image, prompt=prompt, num_inference_steps=2, height=64, width=48, max_area=64 * 48,
                 guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        pipe.transformer.forward = forward
    return seen


def test_conditioner_denoise_and_shift_are_what_the_pipeline_feeds_its_transformer(parts):
    """The input image given as a dataset gives it (cut to its bucket, in [-1, 1]): the conditioner's text states and
    input-image tokens and ids, denoise's prediction, and the objective's shifted sigma equal those of a real
    FluxKontextPipeline call on that image (auto-resized to its preferred 1248 x 832 for 3:2)."""
    pipe = KONTEXT.build_pipeline(parts.components, parts.noise_scheduler)
    image = random_image(48, 32, seed=1)
    first, second = record_transformer_calls(pipe, image, "make it red")
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
    noisy, sigmas = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = KONTEXT.denoise(parts.transformer, noisy, sigmas,
                                   conditioner(prompts, {"condition_pixels": images}, CPU))
        for i in range(2):
            alone = conditioner(prompts[i : i + 1], {"condition_pixels": images[i : i + 1]}, CPU)
            single = KONTEXT.denoise(parts.transformer, noisy[i : i + 1], sigmas[i : i + 1], alone)
            assert torch.allclose(together[i : i + 1], single, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_kontext, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, data) of lora_flux_kontext.yaml overfitting one edit for STEPS steps on the tiny
    model (fp32 on the CPU, rank 4, input images at a 64x64 area to keep it quick), with an edit preview."""
    workdir = tmp_path_factory.mktemp("flux_kontext_run")
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(workdir / "data", num=1, captions="edit")
    result = cli_in_process([
        "-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_flux_kontext.yaml",
        f"model.pretrained_model_name_or_path={tiny_kontext}", "mixed_precision=null", "model.condition_area=4096",
        f"data.dataset1.source.data_source1.img_root={data}", "train.workers=0", "train.scheduler.num_warmup_steps=0",
        'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1",
        f"train.train_steps={STEPS}", "train.log_step=1", "train.save_step=1000", "transformer_lr=1e-2",
        "train.loss.logit_std=0.3", "lora_transformer.0.rank=4", "lora_transformer.0.alpha=4",
        f"previewer={{step: {STEPS}, prompts: ['make the circle red'], width: 64, height: 64, "
        f"num_inference_steps: 2, condition_images: ['{data}/input/0.png']}}",
    ], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return tiny_kontext, next((workdir / "exps").iterdir()), data


@pytest.mark.e2e
def test_shipped_config_overfits_one_edit_and_previews_it(trained):
    _, exp, _ = trained
    log = (exp / "train.log").read_text()
    losses = [float(value) for value in re.findall(rf"step \d+/{STEPS} loss ([\d.]+)", log)]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, (first, last)
    assert Image.open(exp / "preview" / f"{STEPS}-0.png").size == (64, 64)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    from hcpdiff.tools.lora_convert import main as lora_convert

    model, exp, data = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/edit_flux_kontext.yaml",
                           f"pretrained_model={model}", "dtype=fp32", f"lora_path={lora}",
                           "prompt='make the circle red'", f"condition_image={data}/input/0.png",
                           f"save.out_dir={tmp_path / 'out'}", "infer_args.width=64", "infer_args.height=48",
                           "infer_args.num_inference_steps=2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (image_file,) = sorted((tmp_path / "out").glob("*.png"))
    assert json.loads(Image.open(image_file).info["hcpdiff"])["condition_image"] == f"{data}/input/0.png"
    rendered = np.asarray(Image.open(image_file).convert("RGB"), dtype=np.int16)
    assert rendered.shape == (48, 64, 3)  # the requested size, not the pipeline's default megapixel

    converted = tmp_path / "pytorch_lora_weights.safetensors"
    assert lora_convert(["--to_diffusers", "--lora_path", str(lora), "--dump_path", str(converted)]) == 0
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
