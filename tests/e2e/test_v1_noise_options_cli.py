"""End-to-end: HCP v1's noise and optimizer examples (pyramid noise, zero terminal SNR, Lion) train the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


def train(cli_in_process, workdir: Path, cfg: str, tiny_model: Path, data: Path, exp_dir: str, *extra: str):
    """Two optimizer steps of a shipped example config on the tiny model, 64 px, in this process."""
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", cfg, f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "data.dataset1.batch_size=2",
            "train.train_steps=2", "train.save_step=2", "train.log_step=1", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
            f"exp_dir={exp_dir}", *extra]
    done = cli_in_process(args, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir / exp_dir


def moved(exp: Path) -> bool:
    state = load_file(exp / "ckpts/unet-2.safetensors")
    return any(state[key].abs().sum() > 0 for key in state if key.endswith("lora_B.weight"))


def test_pyramid_noise_and_lion_examples_train(cli_in_process, workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=2)
    pyramid = train(cli_in_process, workdir, "cfgs/train/examples/pyramid_noise.yaml", tiny_model, data, "exps/pyr")
    lion = train(cli_in_process, workdir, "cfgs/train/examples/lion_optimizer.yaml", tiny_model, data, "exps/lion")
    assert moved(pyramid) and moved(lion)
    assert "pyramid_noise_levels: 6" in (pyramid / "cfg.yaml").read_text()
    # Lion keeps one moment per parameter; AdamW (train_base's, under pyramid_noise.yaml) keeps two
    lion_state = torch.load(lion / "state/step-2.pt", weights_only=False)["optimizer"]["state"]
    adamw_state = torch.load(pyramid / "state/step-2.pt", weights_only=False)["optimizer"]["state"]
    assert lion_state and all(set(entry) == {"exp_avg"} for entry in lion_state.values())
    assert all({"exp_avg", "exp_avg_sq"} <= set(entry) for entry in adamw_state.values())
    # a sign update: after two steps from lora_B = 0, every moved entry is at most 2 * lr (+ decay) from 0
    lr = 3e-5
    lora_b = [t for key, t in load_file(lion / "ckpts/unet-2.safetensors").items() if key.endswith("lora_B.weight")]
    assert max(t.abs().max().item() for t in lora_b) <= 2 * lr * 1.001


def test_zero_terminal_snr_example_trains_and_previews(cli_in_process, workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=2)
    previewer = ("previewer={step: 2, prompts: ['a cat'], seed: 1, width: 64, height: 64, num_inference_steps: 2, "
                 "guidance_scale: 5.0}")
    exp = train(cli_in_process, workdir, "cfgs/train/examples/zero_terminal_snr.yaml", tiny_model, data, "exps/zsnr",
                previewer)
    assert moved(exp)
    assert Image.open(exp / "preview/2-0.png").size == (64, 64)  # PNDM becomes trailing zero-SNR DDIM for previews

    refused = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/zero_terminal_snr.yaml",
                              f"model.pretrained_model_name_or_path={tiny_model}", "train.loss.prediction_type=epsilon",
                              f"data.dataset1.source.data_source1.img_root={data}", "exp_dir=exps/eps"], cwd=workdir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.loss.zero_terminal_snr" in errors[0] and "v_prediction" in errors[0]
