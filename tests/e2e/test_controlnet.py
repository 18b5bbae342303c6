"""ControlNet: the residuals the trainer feeds the U-Net against a real StableDiffusionControlNetPipeline call, a
loss falling while one pair is overfit, a new ControlNet trained on (control image, prompt, image) rows with its
checkpoint exported as a diffusers folder, a run continuing a saved ControlNet with LoRA on it, the
visualizer rendering with one and two ControlNets, SDXL training, and the one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcpdiff.config import load_config
from hcpdiff.families import family_named
from hcpdiff.infer import generate
from hcpdiff.models import load_model_parts
from hcpdiff.models.controlnet import controlnet_base, needs_init_folder, new_or_loaded_controlnet
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.tools.make_tiny_model import make_tiny_controlnet

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SD = family_named("sd")
SMALL_DATA = ['data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1",
              "data.dataset1.batch_size=2", "train.workers=0", "train.scheduler.num_warmup_steps=0"]
SMALL_RENDER = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=2"]


def as_pixels(image: Image.Image) -> torch.Tensor:
    """What a dataset gives for an image: [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model) -> Path:
    """A work folder with cfgs/, the pairs dataset (control images in input/, metadata column edit_image) and a tiny
    diffusers ControlNet for the tiny SD."""
    root = tmp_path_factory.mktemp("controlnet")
    (root / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    make_demo_data(root / "data", num=2, captions="edit")
    make_tiny_controlnet(tiny_model, root / "tiny_controlnet")
    return root


def train_args(folder: Path, model: Path, *overrides: str, cfg: str = "controlnet.yaml") -> list[str]:
    data = folder / "data"
    return ["-m", "hcpdiff.train_ac_single", "--cfg", f"cfgs/train/examples/{cfg}",
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data / 'metadata.csv'}",
            "data.dataset1.source.data_source1.condition_column=edit_image", *SMALL_DATA, *overrides]


def test_residuals_and_prediction_are_what_the_controlnet_pipeline_feeds_its_unet(tiny_model, folder):
    """The control image as a dataset gives it ([-1, 1]): control_residuals and denoise give the U-Net's residual
    arguments and output of a real StableDiffusionControlNetPipeline step on that image."""
    parts = load_model_parts(str(tiny_model))
    controlnet = ControlNetModel.from_pretrained(folder / "tiny_controlnet")
    pipe = SD.build_pipeline({**parts.components, "controlnet": controlnet}, parts.noise_scheduler)
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    image = Image.open(folder / "data/input/0.png").convert("RGB").resize((64, 64))
    seen = {}
    forward = pipe.unet.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        seen.setdefault("args", args)
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])
        return output

    pipe.unet.forward = recording
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(prompt="a square", image=image, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
             generator=torch.Generator().manual_seed(0), output_type="latent")
        sample, timestep = seen["args"][:2]
        conditioning = {"encoder_hidden_states": seen["kwargs"]["encoder_hidden_states"]}
        residuals = SD.control_residuals(controlnet, sample, timestep, conditioning, as_pixels(image)[None])
        for ours, theirs in zip(residuals["down_block_additional_residuals"],
                                seen["kwargs"]["down_block_additional_residuals"], strict=True):
            assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(residuals["mid_block_additional_residual"],
                              seen["kwargs"]["mid_block_additional_residual"], atol=1e-6)
        prediction = SD.denoise(parts.unet, sample, timestep, {**conditioning, **residuals})
    assert torch.allclose(prediction, seen["output"], atol=1e-5)


def test_new_controlnets_from_the_unets_weights_or_random(tiny_model):
    """`model.controlnet: unet` copies the U-Net's encoder weights; `new` builds the same architecture at random;
    both start with zero convolutions (the first step renders as the base)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    copied, random = (new_or_loaded_controlnet(value, SD, {"unet": unet}, "model.controlnet")
                      for value in ("unet", "new"))
    assert torch.equal(copied.conv_in.weight, unet.conv_in.weight)
    assert copied.conv_in.weight.shape == random.conv_in.weight.shape
    assert not torch.equal(random.conv_in.weight, unet.conv_in.weight)
    assert all(float(conv.weight.abs().max()) == 0
               for model in (copied, random) for conv in model.controlnet_down_blocks)
    assert needs_init_folder("new") and needs_init_folder("unet")


def test_loss_falls_while_the_controlnet_overfits_one_pair(tiny_model, folder):
    """Six Adam steps on the ControlNet alone, one pair at a fixed timestep and noise, lower the U-Net's loss."""
    parts = load_model_parts(str(tiny_model))
    controlnet = ControlNetModel.from_unet(parts.unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    parts.unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([500])
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    control = as_pixels(Image.open(folder / "data/input/0.png").convert("RGB").resize((64, 64)))[None]
    conditioning = {"encoder_hidden_states": torch.randn(1, 77, 32, generator=generator)}
    optimizer = torch.optim.Adam(controlnet.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        residuals = SD.control_residuals(controlnet, noisy, timesteps, conditioning, control)
        loss = torch.nn.functional.mse_loss(SD.denoise(parts.unet, noisy, timesteps, {**conditioning, **residuals}),
                                            noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.fixture(scope="module")
def trained(folder, tiny_model, cli_in_process) -> Path:
    """A new ControlNet from the tiny U-Net, trained 2 steps on the pairs with a preview; its experiment folder."""
    run = cli_in_process(train_args(folder, tiny_model, "train.train_steps=2", "controlnet_lr=1e-3",
                                    "exp_dir=exps/new",
                                    "previewer={step: 2, prompts: [a square], width: 64, height: 64, "
                                    f"num_inference_steps: 2, condition_images: [{folder / 'data/input/0.png'}]}}"),
                         cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "exps/new"


def test_a_new_controlnet_trains_and_exports_as_a_diffusers_folder(trained, folder, cli_in_process):
    ckpt = trained / "ckpts/controlnet-2.safetensors"
    assert sorted(p.name for p in (trained / "ckpts").iterdir()) == ["controlnet-2.safetensors"]
    init = ControlNetModel.from_pretrained(trained / "controlnet-init")
    saved = load_file(ckpt)
    assert saved.keys() == init.state_dict().keys()  # `layers: ['']`: every tensor, under the model's own names
    moved = [key for key in saved if key.startswith("controlnet_down_blocks")]
    assert moved and all(not torch.equal(saved[key], init.state_dict()[key]) for key in moved)  # zero convs moved
    with safe_open(str(ckpt), "pt") as opened:
        metadata = opened.metadata()
    assert metadata["part"] == "controlnet" and Path(metadata["controlnet_base"]) == trained / "controlnet-init"
    assert json.loads(metadata["controlnet_config"])["block_out_channels"] == [32, 64]
    assert (trained / "preview/2-0.png").is_file()

    out = folder / "exported"
    run = cli_in_process(["-m", "hcpdiff.tools.export_controlnet", str(ckpt), str(out)], cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    exported = ControlNetModel.from_pretrained(out).state_dict()
    assert exported.keys() == saved.keys() and all(torch.equal(exported[key], saved[key]) for key in saved)


def test_continuing_a_saved_controlnet_with_lora(trained, folder, tiny_model, cli_in_process):
    """model.controlnet names the checkpoint: the run starts from its weights (written as its base), and a
    lora_controlnet group saves LoRA on it."""
    ckpt = trained / "ckpts/controlnet-2.safetensors"
    lora = "lora_controlnet=[{lr: 1e-2, rank: 2, layers: ['re:.*\\.attn.?$']}]"
    run = cli_in_process(train_args(folder, tiny_model, "train.train_steps=1", f"model.controlnet={ckpt}",
                                    "controlnet=null", lora, "exp_dir=exps/continued"), cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    start = ControlNetModel.from_pretrained(folder / "exps/continued/controlnet-init").state_dict()
    saved = load_file(ckpt)
    assert all(torch.equal(start[key], saved[key]) for key in saved)
    lora_ckpt = folder / "exps/continued/ckpts/controlnet-1.safetensors"
    state = load_file(lora_ckpt)
    assert state and all(".lora_" in key or key.endswith(".alpha") for key in state)
    with safe_open(str(lora_ckpt), "pt") as opened:
        assert Path(opened.metadata()["controlnet_base"]) == folder / "exps/continued/controlnet-init"
    # a diffusers folder continued is its checkpoints' base itself: nothing is written
    tiny = folder / "tiny_controlnet"
    assert not needs_init_folder(str(tiny)) and controlnet_base(str(tiny), folder / "exps/x") == str(tiny.resolve())


def test_visualizer_renders_with_one_and_two_controlnets(trained, folder, tiny_model, monkeypatch):
    """The image changes with a ControlNet's scale; two ControlNets render through
    MultiControlNetModel; the PNG's metadata records them."""
    monkeypatch.chdir(folder)
    control = str(folder / "data/input/0.png")
    tiny = str(folder / "tiny_controlnet")

    def render(*overrides: str) -> tuple[np.ndarray, dict]:
        out = folder / f"out{len(list(folder.glob('out*')))}"
        (path,) = generate(load_config("cfgs/infer/controlnet.yaml", [
            *SMALL_RENDER, f"pretrained_model={tiny_model}", "prompt=a square", f"save.out_dir={out}", *overrides]))
        image = Image.open(path)
        info = json.loads(image.text["hcpdiff"])
        assert all(f"ControlNet {i}: " in image.text["parameters"] for i in range(len(info["controlnet"])))
        return np.asarray(image.convert("RGB")).astype(np.int16), info

    zero, _ = render(f"controlnet_path={tiny}", f"control_image={control}", "controlnet_scale=0")
    one, info = render(f"controlnet_path={tiny}", f"control_image={control}")
    assert np.abs(one - zero).mean() > 0.5
    assert info["controlnet"] == [{"path": tiny, "image": control, "scale": 1.0}]
    two = f"controlnet=[{{path: {tiny}, image: {control}, scale: 1.0}}, " \
          f"{{path: {trained / 'ckpts/controlnet-2.safetensors'}, image: {control}, scale: 0.5}}]"
    both, info = render(two)
    assert np.abs(both - one).mean() > 0.0 and [entry["scale"] for entry in info["controlnet"]] == [1.0, 0.5]


def test_sdxl_trains_a_new_controlnet_and_renders_with_it(folder, tiny_sdxl, cli_in_process, monkeypatch):
    monkeypatch.chdir(folder)  # the infer config's _base_ path is cfgs/...
    run = cli_in_process(train_args(folder, tiny_sdxl, "train.train_steps=1", "exp_dir=exps/sdxl",
                                    cfg="controlnet_sdxl.yaml"), cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = folder / "exps/sdxl/ckpts/controlnet-1.safetensors"
    assert any(key.startswith("add_embedding.") for key in load_file(ckpt))  # SDXL's text_time embedding
    (path,) = generate(load_config(str(REPO_ROOT / "cfgs/infer/controlnet.yaml"), [
        *SMALL_RENDER, f"pretrained_model={tiny_sdxl}", "prompt=a square", f"save.out_dir={folder / 'out_sdxl'}",
        f"controlnet_path={ckpt}", f"control_image={folder / 'data/input/0.png'}"]))
    assert Image.open(path).size == (64, 64)


@pytest.mark.parametrize("overrides, key", [
    (["model.controlnet=null"], "controlnet: no ControlNet to train; set model.controlnet"),
    (["data.dataset1.source.data_source1.condition_column=null"],
     "data.dataset1.source.data_source1.condition_column: a ControlNet trains on"),
    (["previewer={step: 1, prompts: [a], condition_images: [nowhere.png]}"],
     "previewer.condition_images: image file 'nowhere.png' does not exist"),
])
def test_training_refusals_are_one_line(folder, tiny_model, cli_in_process, overrides, key):
    run = cli_in_process(train_args(folder, tiny_model, *overrides), cwd=folder)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], run.stderr


def test_make_tiny_model_refuses_a_controlnet_for_a_family_without(folder, cli_in_process):
    run = cli_in_process(["-m", "hcpdiff.tools.make_tiny_model", str(folder / "x"), "--family", "flux",
                          "--controlnet", str(folder / "y")], cwd=folder)
    assert run.returncode == 2 and run.stderr.strip() == (
        "error: --controlnet: a flux model takes no ControlNet here (sd, sd2 and sdxl do)"), run.stderr
    assert not (folder / "x").exists()
