"""The training step reads the loss on log steps only: what train.log and TensorBoard show is still the mean of every
micro-step's loss; the batch's pixels travel as uint8 and become the same floats on the device."""
from __future__ import annotations

import re

import pytest
import torch

from hcpdiff.config import load_config
from hcpdiff.data.images import to_tensor, to_uint8_tensor
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.trainer import Trainer
from hcpdiff.train.transfer import batch_on_device

pytestmark = pytest.mark.e2e


class RecordingTrainer(Trainer):
    """The trainer, also keeping each micro-step's loss as `.item()` read it then (the eager reference)."""

    def compute_loss(self, batch: dict, loss_weight: float, noise_salt: int = 0) -> torch.Tensor:
        loss = super().compute_loss(batch, loss_weight, noise_salt)
        self.micro_losses.append(loss.detach().item())
        return loss

    def log_metrics(self, loss: float, step_time: float) -> None:
        self.logged[self.global_step] = loss
        super().log_metrics(loss, step_time)


def test_logged_loss_is_the_mean_of_every_micro_step(workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=4)
    cfg = load_config("cfgs/train/examples/demo_tiny.yaml", [
        f"model.pretrained_model_name_or_path={tiny_model}", f"data.dataset1.source.data_source1.img_root={data}",
        f"data.dataset1.source.data_source1.caption_file={data}", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
        "train.train_steps=3", "train.log_step=2", "train.gradient_accumulation_steps=2", "train.save_step=100",
        "exp_dir=exps/logged", "model.ema={decay: 0.9}", "data.dataset1.cache_latents=false"])  # pixels: uint8 path
    trainer = RecordingTrainer(cfg, single_process=True)
    trainer.micro_losses, trainer.logged = [], {}
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    # step 2 logs micro-steps 1-4, step 3 (the last) micro-steps 5-6: each a plain Python mean of `.item()` values
    losses = trainer.micro_losses
    expected = {2: sum(losses[0:4]) / 4, 3: sum(losses[4:6]) / 2}
    assert len(losses) == 6 and trainer.logged == expected  # exactly, not approximately
    log_lines = re.findall(r"step (\d+)/3 loss ([0-9.]+)", (workdir / "exps/logged/train.log").read_text())
    assert dict(log_lines) == {str(step): f"{loss:.5f}" for step, loss in expected.items()}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((workdir / "exps/logged/tblog").rglob("events.*")).parent)).Reload()
    board = {event.step: event.value for event in events.Scalars("loss")}
    assert board == {step: torch.tensor(loss).float().item() for step, loss in expected.items()}  # stored as fp32


def test_uint8_pixels_become_the_float_pixels_on_the_device():
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8).numpy(), "RGB")
    batch = {"pixel_values": to_uint8_tensor(image)[None], "latents": torch.ones(1, 4, 1, 1, dtype=torch.bfloat16),
             "prompts": ["a"]}
    moved = batch_on_device(batch, torch.device("cpu"))
    assert torch.equal(moved["pixel_values"], to_tensor(image)[None])  # bit for bit what the dataset gave before
    assert moved["latents"].dtype == torch.float32 and moved["prompts"] == ["a"]
    assert batch["pixel_values"].dtype == torch.uint8  # the host batch is left as it was


def run_tiny(workdir, tiny_model, data, exp_dir: str, *extra: str) -> RecordingTrainer:
    """Two steps of demo_tiny.yaml at 64 px (pixels encoded every step) with a preview at step 2."""
    cfg = load_config("cfgs/train/examples/demo_tiny.yaml", [
        f"model.pretrained_model_name_or_path={tiny_model}", f"data.dataset1.source.data_source1.img_root={data}",
        f"data.dataset1.source.data_source1.caption_file={data}", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
        "train.train_steps=2", "train.log_step=1", "data.dataset1.cache_latents=false", f"exp_dir={exp_dir}",
        "previewer={step: 2, prompts: ['a cat'], seed: 1, width: 64, height: 64, num_inference_steps: 2}", *extra])
    trainer = RecordingTrainer(cfg, single_process=True)
    trainer.micro_losses, trainer.logged = [], {}
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def test_compiled_denoiser_trains_like_the_eager_one_and_previews(workdir, tiny_model):
    # aot_eager traces the U-Net's forward and backward as inductor would, without generating kernels (inductor
    # itself: minutes on a tiny U-Net on 2 CPU cores; tools/bench_train_step.py --compile runs it)
    from safetensors.torch import load_file

    data = make_demo_data(workdir / "data", num=2)
    eager_run = run_tiny(workdir, tiny_model, data, "exps/eager")
    compiled = run_tiny(workdir, tiny_model, data, "exps/compiled", "train.compile={backend: aot_eager}")
    assert compiled.parts.unet._compiled_call_impl is not None  # compiled in place, not wrapped
    eager_ckpt = load_file(workdir / "exps/eager/ckpts/unet-2.safetensors")
    compiled_ckpt = load_file(workdir / "exps/compiled/ckpts/unet-2.safetensors")
    assert compiled_ckpt.keys() == eager_ckpt.keys()
    assert all(torch.allclose(compiled_ckpt[key], eager_ckpt[key], atol=1e-5) for key in eager_ckpt)
    assert compiled.micro_losses == pytest.approx(eager_run.micro_losses, rel=1e-4)
    assert (workdir / "exps/compiled/preview").is_dir() and any((workdir / "exps/compiled/preview").iterdir())


@pytest.mark.parametrize("value, message", [
    ("{mode: fastest}", "train.compile.mode: 'fastest' is not one of"),
    ("{backend: nope}", "train.compile.backend: 'nope' is not a torch.compile backend"),
    ("{dynmic: true}", "train.compile"),
])
def test_bad_compile_settings_are_named(value, message):
    from omegaconf import OmegaConf

    from hcpdiff.errors import ConfigError
    from hcpdiff.train.compile import read_compile_spec

    with pytest.raises(ConfigError, match=re.escape(message)):
        read_compile_spec(OmegaConf.create(f"c: {value}")["c"])


def test_compile_is_refused_where_it_cannot_work(workdir, tiny_model, cli_in_process, one_error_line):
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                             f"model.pretrained_model_name_or_path={tiny_model}", "train.compile=true",
                             "model.gradient_checkpointing=offload"], cwd=workdir)
    assert "train.compile: model.gradient_checkpointing 'offload'" in one_error_line(result)
