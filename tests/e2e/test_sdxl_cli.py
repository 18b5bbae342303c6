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
