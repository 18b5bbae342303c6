"""FSDP2 through accelerate's config file, for real, on two CPU processes over gloo: the shipped
cfgs/accelerate/fsdp2.yaml (with use_cpu and no mixed precision) trains a LoRA and fully fine-tuned U-Net layers
sharded, with gradient accumulation, and they equal one process's with the same total batch; a resumed run ends bit
for bit like an uninterrupted one. accelerate selects FSDP only for GPU-like devices, so tests/e2e/fsdp2_on_cpu.py
labels the gloo group as one (see its docstring); the sharding is torch's fully_shard, unchanged."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UNET_GROUP = r"unet=[{lr: 1e-2, layers: [conv_in, 're:down_blocks\.0\.resnets\.\d\.norm1']}]"


def test_fsdp2_trains_what_one_process_trains_and_resumes_exactly(workdir, tiny_model, cli, cli_in_process,
                                                                   free_port):
    # one bucket: every step's global batch is both images. Step 1 warms up at lr 0: a first Adam step moves
    # weights with near-zero gradients by about lr either way, which float summation order decides.
    data = make_demo_data(workdir / "data", num=2)
    args = ["--cfg", "cfgs/train/examples/demo_tiny.yaml", f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1",
            "train.train_steps=2", "train.save_step=1", "train.scheduler.num_warmup_steps=1",
            "train.gradient_accumulation_steps=2", UNET_GROUP]
    accelerate_config = yaml.safe_load((REPO / "cfgs/accelerate/fsdp2.yaml").read_text())
    accelerate_config.update(use_cpu=True, mixed_precision="no")
    (workdir / "fsdp2_cpu.yaml").write_text(yaml.safe_dump(accelerate_config))

    def fsdp(*extra: str):
        result = cli([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "fsdp2_cpu.yaml",
                      "--main_process_port", str(free_port()), str(REPO / "tests/e2e/fsdp2_on_cpu.py"), *args,
                      "data.dataset1.batch_size=1", *extra], cwd=workdir, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    one = cli_in_process(["-m", "hcpdiff.train_ac_single", *args, "data.dataset1.batch_size=2", "exp_dir=exps/one"],
                         cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp("exp_dir=exps/fsdp")
    log = (workdir / "exps/fsdp/train.log").read_text()
    assert "total batch size 4 (batch 1 x accumulation 2 x processes 2)" in log  # FSDP2's no-sync micro-steps
    held, total = map(int, re.search(r"FSDP2: the unet's weights, gradients and optimizer state are sharded over 2 "
                                     r"processes \(this one holds (\d+) of its (\d+) parameters\)", log).groups())
    assert held < 0.6 * total  # sharded, not replicated
    reference, sharded = load_file(workdir / "exps/one/ckpts/unet-2.safetensors"), load_file(
        workdir / "exps/fsdp/ckpts/unet-2.safetensors")
    assert sharded.keys() == reference.keys() and "conv_in.weight" in sharded
    for key in reference:
        assert sharded[key].shape == reference[key].shape, key  # gathered whole, not one process's shard
        assert torch.allclose(sharded[key], reference[key], atol=1e-5), key
    assert float(sharded["conv_in.weight"].sub(load_file(workdir / "exps/one/ckpts/unet-1.safetensors")[
        "conv_in.weight"]).abs().max()) > 1e-4  # step 2 trained the fine-tuned layer
    state = torch.load(workdir / "exps/fsdp/state/step-1.pt", weights_only=True)
    assert "conv_in.weight" in state["optimizer"]["state"]  # the whole optimizer state, keyed by parameter name

    shutil.copytree(workdir / "exps/fsdp", workdir / "exps/cut")  # an interrupted copy: step 2 is gone
    for path in [workdir / "exps/cut/ckpts/unet-2.safetensors", workdir / "exps/cut/state/step-2.pt"]:
        path.unlink()
    resumed = fsdp("train.resume=exps/cut")
    assert "resumed exps/cut at step 1" in resumed.stderr
    again = load_file(workdir / "exps/cut/ckpts/unet-2.safetensors")
    assert all(torch.equal(again[key], sharded[key]) for key in sharded), "resumed weights differ"
