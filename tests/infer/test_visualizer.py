"""The visualizer as a user runs it: images with their settings, seeds, LoRA alphas, new components, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcpdiff.config import load_config
from hcpdiff.infer import generate, parse_prompt_weights
from hcpdiff.lora import LoraGroupSpec, attach_lora, lora_metadata, lora_state_dict, save_lora

SMALL = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=4", "neg_prompt=ugly"]


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory, tiny_model: Path) -> Path:
    """A native U-Net LoRA on the tiny model with random nonzero weights (strong enough to change images)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    layers = [r"re:.*\.to_[qkv]$", r"re:.*\.to_out\.0$", r"re:.*ff\.net\.2$"]
    groups = attach_lora(unet, [LoraGroupSpec(lr=1e-4, layers=layers, rank=4, alpha=2.0)], "unet", "lora_unet")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "unet-1.safetensors"
    save_lora(path, lora_state_dict(unet), lora_metadata("unet", str(tiny_model), groups, 1))
    return path


def render(workdir: Path, cfg: str, *overrides: str) -> list[np.ndarray]:
    """Run the visualizer in-process into a fresh folder; the images as uint8 arrays."""
    out_dir = workdir / f"out{len(list(workdir.glob('out*')))}"
    paths = generate(load_config(cfg, [*SMALL, f"save.out_dir={out_dir}", *overrides]))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_images_written_with_settings(cli, workdir, tiny_model, unet_lora):
    done = cli(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/t2i_lora.yaml", f"pretrained_model={tiny_model}",
                f"lora_path={unet_lora}", "lora_alpha=0.8", "prompt=[a cat, '{a dog:1.2}']", "num=2", "bs=3",
                *SMALL, "save.out_dir=imgs"], cwd=workdir)
    assert done.returncode == 0, done.stderr
    images = sorted((workdir / "imgs").glob("*.png"))
    assert [p.name for p in images] == ["0000-42.png", "0001-43.png", "0002-42.png", "0003-43.png"]
    assert (workdir / "imgs" / "cfg.yaml").is_file()
    text = Image.open(images[3]).text
    assert text["parameters"].startswith("{a dog:1.2}\nNegative prompt: ugly\nSteps: 4,")
    assert "Seed: 43" in text["parameters"] and "Size: 64x64" in text["parameters"]
    info = json.loads(text["hcpdiff"])
    assert info["lora"] == [str(unet_lora)] and info["guidance_scale"] == 7.5 and info["seed"] == 43
    assert Image.open(images[0]).size == (64, 64)


def test_same_seed_same_image_whatever_the_batch(workdir, tiny_model):
    model = f"pretrained_model={tiny_model}"
    first = render(workdir, "cfgs/infer/text2img.yaml", model, "num=2", "bs=2")
    again = render(workdir, "cfgs/infer/text2img.yaml", model, "num=2", "bs=2")
    single = render(workdir, "cfgs/infer/text2img.yaml", model, "num=2", "bs=1")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    # another batch size changes float summation order only: images agree to a level or two
    assert all(np.abs(a.astype(int) - b).max() <= 3 for a, b in zip(first, single))
    assert not np.array_equal(first[0], first[1])


def test_alpha_zero_is_the_base_model_and_alpha_one_matches_diffusers(workdir, tiny_model, unet_lora, cli_in_process):
    from diffusers import StableDiffusionPipeline

    model = f"pretrained_model={tiny_model}"
    base = render(workdir, "cfgs/infer/text2img.yaml", model)[0]
    zero = render(workdir, "cfgs/infer/t2i_lora.yaml", model, f"lora_path={unet_lora}", "lora_alpha=0")[0]
    ours = render(workdir, "cfgs/infer/t2i_lora.yaml", model, f"lora_path={unet_lora}", "lora_alpha=1")[0]
    assert np.array_equal(base, zero)

    webui = workdir / "lora.safetensors"
    assert cli_in_process(["-m", "hcpdiff.tools.lora_convert", "--to_webui", "--lora_path", str(unet_lora),
                           "--dump_path", str(webui)], cwd=workdir).returncode == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(webui))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("masterpiece, best quality, 1girl, solo", negative_prompt="ugly", width=64, height=64,
                  num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(42),
                  output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.int16)
    lora_effect = np.abs(ours.astype(np.int16) - base).mean()
    assert lora_effect > 1.0
    assert np.abs(ours.astype(np.int16) - theirs).mean() < 0.01 * lora_effect


def test_prompt_weights_parse_and_change_the_image(workdir, tiny_model):
    assert parse_prompt_weights("a (b:1.2) {c:0.5} (d)") == [("a ", 1.0), ("b", 1.2), (" ", 1.0), ("c", 0.5), (" ", 1.0), ("d", 1.1)]
    model = f"pretrained_model={tiny_model}"
    plain = render(workdir, "cfgs/infer/text2img.yaml", model, "prompt='a cat'")[0]
    weighted = render(workdir, "cfgs/infer/text2img.yaml", model, "prompt='a (cat:1.5)'")[0]
    long = render(workdir, "cfgs/infer/text2img.yaml", model, "prompt='" + "a cat, " * 40 + "'")[0]
    assert not np.array_equal(plain, weighted) and long.shape == plain.shape


def test_new_components_example_with_a_vae_folder(workdir, tiny_model, unet_lora):
    images = render(workdir, "cfgs/infer/t2i_dpmpp_vae.yaml", f"pretrained_model={tiny_model}",
                    f"lora_path={unet_lora}", f"new_components.vae.pretrained_model_name_or_path={tiny_model / 'vae'}", *SMALL)
    assert images[0].shape == (64, 64, 3)
    out_cfg = sorted(workdir.glob("out*/cfg.yaml"))[-1].read_text()
    assert "DPMSolverMultistepScheduler" in out_cfg


@pytest.mark.parametrize("override, words", [("infer_args.widht=64", "widht"), ("bogus=1", "bogus")])
def test_bad_key_is_one_error_line(cli_in_process, workdir, tiny_model, override, words):
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml",
                           f"pretrained_model={tiny_model}", override], cwd=workdir)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], done.stderr


@pytest.mark.parametrize("cfg", sorted(p.name for p in (Path(__file__).parents[2] / "cfgs" / "infer").glob("*.yaml")))
def test_every_shipped_infer_config_loads(workdir, cfg):
    from hcpdiff.config import check_targets

    check_targets(load_config(f"cfgs/infer/{cfg}"))


def test_multi_lora_layers_filter(workdir, tiny_model, unet_lora):
    model = f"pretrained_model={tiny_model}"
    base = render(workdir, "cfgs/infer/text2img.yaml", model)[0]
    only_attn2 = render(workdir, "cfgs/infer/t2i_multi_lora.yaml", model, f"merge.group_unet.lora.1.path={unet_lora}")[0]
    whole = render(workdir, "cfgs/infer/t2i_multi_lora.yaml", model, f"merge.group_unet.lora.0.path={unet_lora}",
                   "merge.group_unet.lora.0.alpha=0.5")[0]
    assert not np.array_equal(base, only_attn2) and not np.array_equal(only_attn2, whole)
