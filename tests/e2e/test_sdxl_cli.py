"""End-to-end SDXL: train a U-Net group and a text_encoder_2 group on the tiny SDXL; render it with the visualizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


def test_lora_sdxl_trains_unet_and_text_encoder_2(workdir, tiny_sdxl, cli):
    data = make_demo_data(workdir / "data", num=2, captions="json")
    result = cli(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_sdxl.yaml",
                  f"model.pretrained_model_name_or_path={tiny_sdxl}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data / 'captions.json'}",
                  "data.dataset1.batch_size=2", "train.train_steps=2", "unet_lr=1e-2",
                  "lora_text_encoder_2=[{lr: 1e-2, rank: 2, layers: ['re:.*self_attn$']}]",
                  "train.workers=0", "train.log_step=1", "train.scheduler.num_warmup_steps=0",
                  'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1"],
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = next((workdir / "exps").iterdir())
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == ["text_encoder_2-2.safetensors", "unet-2.safetensors"]
    assert "sdxl" in (exp / "train.log").read_text()
    for part in ("unet", "text_encoder_2"):
        state = load_file(exp / "ckpts" / f"{part}-2.safetensors")
        ups = [value for key, value in state.items() if ".lora_B." in key]
        assert ups and all(torch.count_nonzero(up) > 0 for up in ups), part  # LoRA B starts at 0: it moved
    te2 = load_file(exp / "ckpts" / "text_encoder_2-2.safetensors")
    assert any("self_attn.q_proj" in key for key in te2)


def test_visualizer_renders_the_tiny_sdxl_with_a_lora(workdir, tiny_sdxl, cli):
    """text2img_sdxl.yaml builds StableDiffusionXLPipeline; a LoRA at alpha 1 changes the image, alpha 0 does not."""
    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from hcpdiff.config import load_config
    from hcpdiff.infer import generate
    from hcpdiff.lora import LoraGroupSpec, attach_lora, lora_metadata, lora_state_dict, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    groups = attach_lora(unet, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*\.attn.?$"], rank=4)], "unet", "lora_unet")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    lora = workdir / "unet-1.safetensors"
    save_lora(lora, lora_state_dict(unet), lora_metadata("unet", str(tiny_sdxl), groups, 1))

    def render(alpha: float) -> np.ndarray:
        out = workdir / f"out{alpha}"
        paths = generate(load_config("cfgs/infer/text2img_sdxl.yaml", [
            f"pretrained_model={tiny_sdxl}", "infer_args.width=64", "infer_args.height=64",
            "infer_args.num_inference_steps=2", f"lora_path={lora}", f"lora_alpha={alpha}", f"save.out_dir={out}"]))
        assert len(paths) == 1
        return np.asarray(Image.open(paths[0]).convert("RGB"))

    base, with_lora = render(0.0), render(1.0)
    assert base.shape == (64, 64, 3)
    assert np.abs(base.astype(int) - with_lora.astype(int)).mean() > 0.5


@pytest.mark.parametrize("neg_prompt", ["lowres, blurry", ""])
def test_sdxl_visualizer_matches_diffusers_and_applies_prompt_weights(workdir, tiny_sdxl, neg_prompt):
    """Unweighted prompts render as diffusers' own StableDiffusionXLPipeline does with the same strings (an empty
    negative prompt included); a (span:1.6) weight changes the image."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from hcpdiff.config import load_config
    from hcpdiff.infer import generate

    def render(prompt: str, out: str) -> np.ndarray:
        paths = generate(load_config("cfgs/infer/text2img_sdxl.yaml", [
            f"pretrained_model={tiny_sdxl}", "infer_args.width=64", "infer_args.height=64",
            "infer_args.num_inference_steps=2", f"prompt='{prompt}'", f"neg_prompt='{neg_prompt}'", "seed=5",
            f"save.out_dir={workdir / out}"]))
        return np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)

    plain = render("a red fox, snow, forest", "plain")
    weighted = render("a (red fox:1.6), snow, forest", "weighted")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a red fox, snow, forest", negative_prompt=neg_prompt, width=64, height=64, guidance_scale=5.0,
                     num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    reference = np.asarray(reference.convert("RGB")).astype(int)
    assert np.abs(plain - reference).mean() < 0.5
    assert np.abs(plain - weighted).mean() > 0.1  # the tiny random model listens to its prompt only faintly
