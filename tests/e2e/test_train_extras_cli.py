"""End-to-end: loss options, EMA weights, previews and the extra log values, on the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e

PREVIEWER = ("previewer={step: 2, prompts: ['a cat', 'a (dog:1.3)'], neg_prompt: blurry, seed: 1, width: 64, "
             "height: 64, num_inference_steps: 2, guidance_scale: 5.0}")


def train_args(tiny_model: Path, data: Path, exp_dir: str, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "data.dataset1.batch_size=1",
            "train.train_steps=3", "train.save_step=3", "train.log_step=1", "train.workers=0",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', f"exp_dir={exp_dir}",
            "train.loss.noise_offset=0.1", "train.loss.min_snr_gamma=5", "train.loss.timestep_min=100",
            "train.loss.prediction_type=v_prediction", *extra]


def test_previews_and_ema_leave_training_bit_identical(workdir, tiny_model, cli_in_process):
    """A run with previews and EMA (decay 0.5) ends with the same raw weights as one without previews (decay 0)."""
    data = make_demo_data(workdir / "data", num=2)
    with_previews = cli_in_process(train_args(tiny_model, data, "exps/preview", "model.ema={decay: 0.5}", PREVIEWER),
                                   cwd=workdir)
    assert with_previews.returncode == 0, with_previews.stderr[-3000:]
    plain = cli_in_process(train_args(tiny_model, data, "exps/plain", "model.ema={decay: 0.0}"), cwd=workdir)
    assert plain.returncode == 0, plain.stderr[-3000:]

    preview_exp, plain_exp = workdir / "exps/preview", workdir / "exps/plain"
    raw, raw_plain = (load_file(exp / "ckpts/unet-3.safetensors") for exp in (preview_exp, plain_exp))
    assert raw.keys() == raw_plain.keys() and all(torch.equal(raw[k], raw_plain[k]) for k in raw)
    assert any(raw[k].abs().sum() > 0 for k in raw if k.endswith("lora_B.weight"))

    ema = load_file(preview_exp / "ckpts/unet-ema-3.safetensors")
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if k.endswith("lora_B.weight"))
    ema_zero = load_file(plain_exp / "ckpts/unet-ema-3.safetensors")
    assert all(torch.equal(ema_zero[k], raw_plain[k]) for k in raw_plain)  # decay 0: the average is the weights

    # previews at step 2 and at the end (3), one PNG per prompt, and in TensorBoard
    previews = sorted(p.name for p in (preview_exp / "preview").iterdir())
    assert previews == ["2-0.png", "2-1.png", "3-0.png", "3-1.png"]
    assert Image.open(preview_exp / "preview/3-1.png").size == (64, 64)
    events = b"".join(p.read_bytes() for p in (preview_exp / "tblog").rglob("events.out.tfevents.*"))
    assert b"preview/0" in events and b"loss_smoothed" in events and b"peak_memory_mib" in events
    assert not (plain_exp / "preview").exists()

    log = (preview_exp / "train.log").read_text()
    assert "step 3/3 loss" in log and "(smoothed " in log and "img/s" in log and "peak mem" in log


def test_bad_extra_options_are_reported_together(workdir, tiny_model, cli_in_process):
    data = make_demo_data(workdir / "data", num=1)
    args = train_args(tiny_model, data, "exps/bad", "train.loss.prediction_type=x0", "model.ema={decay: 2}",
                      "train.log_with=[tensorboard, wandb]",
                      "train.optimizer={_target_: prodigyopt.Prodigy, _partial_: true}")
    result = cli_in_process(args, cwd=workdir)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "train.loss.prediction_type: 'x0'" in error[0] and "model.ema.decay" in error[0]
    if "wandb" not in result.stderr or "pip install wandb" in error[0]:
        assert "pip install wandb" in error[0]
    assert "`train.optimizer._target_`" in error[0] and "pip install prodigyopt" in error[0]
    assert not (workdir / "exps").exists()
