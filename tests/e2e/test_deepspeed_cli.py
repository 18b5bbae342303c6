"""DeepSpeed ZeRO-2 through the shipped accelerate config, for real, on two CPU processes (DeepSpeed's CPU
accelerator over gloo): the LoRA it trains equals the same config's under torchrun (DDP)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytest.importorskip("deepspeed", reason="pip install deepspeed (tools/install.sh does)")


def train_args(tiny_model: Path, data: Path) -> list[str]:
    return ["--cfg", "cfgs/train/examples/demo_tiny.yaml", f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            "train.train_steps=4", "train.save_step=2", "train.gradient_accumulation_steps=2",
            "data.dataset1.batch_size=1", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}']


def test_zero2_trains_the_same_lora_as_ddp(tmp_path, tiny_model, cli):
    repo = Path(__file__).resolve().parents[2]
    data = make_demo_data(tmp_path / "data", num=8)
    runs = {}
    for name, launcher in {
        "deepspeed": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(repo / "cfgs/accelerate/deepspeed_zero2.yaml"), "--mixed_precision", "no",
                      "--main_process_port", "29541", "-m", "hcpdiff.train_ac"],
        "ddp": ["torchrun", "--nproc_per_node", "2", "--master_port", "29542", "-m", "hcpdiff.train_ac"],
    }.items():
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "cfgs").symlink_to(repo / "cfgs")
        result = cli([*launcher, *train_args(tiny_model, data)], cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        (exp,) = (workdir / "exps").iterdir()
        runs[name] = exp
    ds_log = (runs["deepspeed"] / "train.log").read_text()
    assert "DEEPSPEED: checkpoints are written, resumable state files are not" in ds_log
    assert "total batch size 4 (batch 1 x accumulation 2 x processes 2)" in ds_log
    # the accelerate file says gradient_accumulation_steps 1; the hcpdiff config's 2 wins, with one warning line
    assert ds_log.count("gradient_accumulation_steps 1 -> 2") == 1
    assert sorted(p.name for p in (runs["deepspeed"] / "ckpts").iterdir()) == ["unet-2.safetensors", "unet-4.safetensors"]
    assert not (runs["deepspeed"] / "state").exists() and (runs["ddp"] / "state").is_dir()
    zero2, ddp = (load_file(runs[name] / "ckpts" / "unet-4.safetensors") for name in ("deepspeed", "ddp"))
    start = load_file(runs["ddp"] / "ckpts" / "unet-2.safetensors")
    assert zero2.keys() == ddp.keys() and len(zero2) > 0
    for key in ddp:
        assert torch.allclose(zero2[key], ddp[key], atol=1e-6), key
    assert any(not torch.equal(ddp[key], start[key]) for key in ddp)  # steps 3-4 trained: the comparison means something
