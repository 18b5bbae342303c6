"""Full fine-tuning groups (`unet:` / `text_encoder:`) beside LoRA groups: what trains, what is saved, resume, render."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcpdiff.config import load_config
from hcpdiff.infer import generate
from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e

UNET_GROUP = r"unet=[{lr: 1e-2, layers: [conv_in, 're:down_blocks\.0\.resnets\.\d\.norm1']}]"


@pytest.fixture
def demo_args(workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=3)
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}']


def base_params(tiny_model: Path, part: str) -> dict[str, torch.Tensor]:
    if part == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    else:
        from transformers import CLIPTextModel

        model = CLIPTextModel.from_pretrained(tiny_model, subfolder=part)
    return {name: p.detach() for name, p in model.named_parameters()}


def test_unet_group_trains_only_its_tensors_and_resumes_bit_for_bit(workdir, demo_args, tiny_model, cli_in_process):
    run = cli_in_process([*demo_args, UNET_GROUP, "train.train_steps=4", "train.save_step=2", "exp_dir=exps/full"],
                         cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = workdir / "exps/full/ckpts/unet-4.safetensors"
    saved = load_file(ckpt)
    base = base_params(tiny_model, "unet")
    expected = {"conv_in.weight", "conv_in.bias"} | {
        name for name in base if re.fullmatch(r"down_blocks\.0\.resnets\.\d\.norm1\.(weight|bias)", name)}
    full_keys = {key for key in saved if ".lora_" not in key and not key.endswith(".alpha")}
    assert full_keys == expected  # only the group's tensors, under the model's own names
    assert any(key.endswith(".lora_A.weight") for key in saved)  # the LoRA group saves beside them
    with safe_open(str(ckpt), "pt") as opened:
        assert set(json.loads(opened.metadata()["full_params"])) == expected
    for name in expected:
        assert saved[name].shape == base[name].shape and not torch.equal(saved[name], base[name]), name
    layers = json.loads((workdir / "exps/full/lora_layers.json").read_text())
    assert layers["unet"][0]["group"] == "unet[0]" and set(layers["unet"][0]["params"]) == expected
    assert "group unet[0]: lr 0.01" in (workdir / "exps/full/train.log").read_text()

    # Resume from step 2: the fine-tuned tensors come back with the LoRA, optimizer and data position.
    shutil.copytree(workdir / "exps/full", workdir / "exps/cut")
    for path in [workdir / "exps/cut/ckpts/unet-4.safetensors", workdir / "exps/cut/state/step-4.pt"]:
        path.unlink()
    resumed = cli_in_process([*demo_args, UNET_GROUP, "train.train_steps=4", "train.save_step=2",
                              "train.resume=exps/cut"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(workdir / "exps/cut/ckpts/unet-4.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_text_encoder_group_alone_trains_the_text_encoder(workdir, demo_args, tiny_model, cli_in_process):
    group = r"text_encoder=[{lr: 1e-3, layers: ['re:encoder\.layers\.0\.self_attn\.(q|k)_proj']}]"
    run = cli_in_process([*demo_args, "lora_unet=[]", group, "train.train_steps=2", "exp_dir=exps/te"], cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "exps/te/ckpts").iterdir()) == ["text_encoder-2.safetensors"]
    saved = load_file(workdir / "exps/te/ckpts/text_encoder-2.safetensors")
    assert sorted(saved) == [f"encoder.layers.0.self_attn.{w}_proj.{t}" for w in "kq" for t in ("bias", "weight")]
    base = base_params(tiny_model, "text_encoder")
    assert all(not torch.equal(saved[k], base[k]) for k in saved)


def test_render_blends_fine_tuned_tensors_by_alpha(workdir, demo_args, tiny_model, cli_in_process):
    run = cli_in_process([*demo_args, "lora_unet=[]", "unet=[{lr: 5e-2, layers: [conv_in, conv_out]}]",
                          "train.train_steps=2", "exp_dir=exps/ft"], cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = workdir / "exps/ft/ckpts/unet-2.safetensors"
    small = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=3",
             f"pretrained_model={tiny_model}"]

    def render(cfg: str, *overrides: str) -> np.ndarray:
        out = workdir / f"out{len(list(workdir.glob('out*')))}"
        paths = generate(load_config(cfg, [*small, f"save.out_dir={out}", *overrides]))
        return np.asarray(Image.open(paths[0]).convert("RGB")).astype(np.int16)

    base = render("cfgs/infer/text2img.yaml")
    zero = render("cfgs/infer/t2i_lora.yaml", f"lora_path={ckpt}", "lora_alpha=0")
    one = render("cfgs/infer/t2i_lora.yaml", f"lora_path={ckpt}", "lora_alpha=1")
    assert np.array_equal(base, zero)
    assert np.abs(one - base).mean() > 0.5

    # The webui format holds LoRA weights only: converting such a file is refused in one line, not truncated.
    converted = cli_in_process(["-m", "hcpdiff.tools.lora_convert", "--to_webui", "--lora_path", str(ckpt),
                                "--dump_path", str(workdir / "x.safetensors")], cwd=workdir)
    assert converted.returncode == 2
    assert "fully fine-tuned" in converted.stderr.strip().splitlines()[-1]
    assert not (workdir / "x.safetensors").exists()


@pytest.mark.parametrize("override, words", [
    ("unet=[{lr: 1e-3, layers: [conv_inn]}]", ["unet[0].layers", "conv_inn", "conv_in"]),
    ("unet=[{lr: 1e-3, layers: [conv_in]}, {lr: 1e-4, layers: ['']}]", ["conv_in.weight", "unet[0]", "unet[1]"]),
    ("unet=[{lr: 1e-3, layer: [conv_in]}]", ["unet[0]", "layer"]),
    ("text_encoder_2=[{lr: 1e-3, layers: ['']}]", ["text_encoder_2"]),
])
def test_bad_fine_tuning_group_is_one_line(workdir, demo_args, cli_in_process, override, words):
    result = cli_in_process([*demo_args, override], cwd=workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(word in line for word in words), line
