"""8-bit AdamW (bitsandbytes' AdamW8bit, the shipped lora_flux_adamw8bit.yaml) trains a tiny FLUX LoRA with uint8
moments in its resume state, and resuming from that state is bit-exact."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytest.importorskip("bitsandbytes", reason='pip install "hcpdiff[optim8bit]" (tools/install.sh test does)')


@pytest.fixture(scope="module")
def tiny_flux(tiny_models) -> Path:
    return tiny_models("flux")


@pytest.mark.e2e
def test_adamw8bit_keeps_uint8_moments_and_resumes_exactly(workdir, tiny_flux, cli_in_process):
    data = make_demo_data(workdir / "data", num=3)
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_flux_adamw8bit.yaml",
            f"model.pretrained_model_name_or_path={tiny_flux}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0", "mixed_precision=null",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"32*32"}',
            "data.dataset1.bucket.num_bucket=1", "data.dataset1.batch_size=2", "train.train_steps=4",
            "train.save_step=2", "transformer_lr=1e-3",
            "train.optimizer.min_8bit_size=64"]  # the tiny model's LoRA tensors are small: 8-bit state for most
    full = cli_in_process([*args, "exp_dir=exps/full"], cwd=workdir)
    assert full.returncode == 0, full.stderr[-3000:]
    state = torch.load(workdir / "exps/full/state/step-4.pt", weights_only=True)["optimizer"]["state"]
    # bitsandbytes keeps each tensor's 8-bit moments (state1, state2) and their scales in a nested mapping
    quant = [entry["__bnb_optimizer_quant_state__"] for entry in state.values()]
    moments = [entry[key] for entry in quant for key in ("state1", "state2") if key in entry]
    assert moments and all(moment.dtype == torch.uint8 for moment in moments)  # both Adam moments in 8 bits

    shutil.copytree(workdir / "exps/full", workdir / "exps/cut")  # cut after step 2
    for path in [workdir / "exps/cut/ckpts/transformer-4.safetensors", workdir / "exps/cut/state/step-4.pt"]:
        path.unlink()
    resumed = cli_in_process([*args, "train.resume=exps/cut"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    left = load_file(workdir / "exps/full/ckpts/transformer-4.safetensors")
    right = load_file(workdir / "exps/cut/ckpts/transformer-4.safetensors")
    start = load_file(workdir / "exps/full/ckpts/transformer-2.safetensors")
    assert left.keys() == right.keys() and all(left[key].equal(right[key]) for key in left)
    assert any(not left[key].equal(start[key]) for key in left)  # steps 3-4 moved the weights
