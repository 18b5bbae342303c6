"""The training step reads the loss on log steps only: what train.log and TensorBoard show is still the mean of every
micro-step's loss; the batch's pixels travel as uint8 and become the same floats on the device."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

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


def run_tiny(workdir: Path, tiny_model: Path, exp_dir: str, *extra: str) -> RecordingTrainer:
    """3 optimizer steps of 2 micro-batches of demo_tiny.yaml at 64 px (pixels encoded every step), EMA on, loss
    logged at steps 2 and 3, a preview at the end."""
    data = workdir / "data"
    if not data.exists():
        make_demo_data(data, num=4)
    with contextlib.chdir(workdir):  # the config's _base_ paths are relative to the working directory
        cfg = load_config("cfgs/train/examples/demo_tiny.yaml", [
            f"model.pretrained_model_name_or_path={tiny_model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "train.train_steps=3", "train.log_step=2",
            "train.gradient_accumulation_steps=2", "train.save_step=100", "data.dataset1.cache_latents=false",
            "model.ema={decay: 0.9}", f"exp_dir={exp_dir}",
            "previewer={step: 3, prompts: ['a cat'], seed: 1, width: 64, height: 64, num_inference_steps: 2}", *extra])
        trainer = RecordingTrainer(cfg, single_process=True)
        trainer.micro_losses, trainer.logged = [], {}
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup()
    return trainer


@pytest.fixture(scope="module")
def workdir_module(tmp_path_factory):
    """One working directory for the module's runs (`cfgs/` resolving as in the repository)."""
    path = tmp_path_factory.mktemp("step")
    (path / "cfgs").symlink_to(Path(__file__).resolve().parents[2] / "cfgs")
    return path


@pytest.fixture(scope="module")
def eager_run(workdir_module, tiny_model) -> RecordingTrainer:
    return run_tiny(workdir_module, tiny_model, str(workdir_module / "exps/eager"))


def test_logged_loss_is_the_mean_of_every_micro_step(eager_run, workdir_module):
    # step 2 logs micro-steps 1-4, step 3 (the last) micro-steps 5-6: each a plain Python mean of `.item()` values
    losses = eager_run.micro_losses
    expected = {2: sum(losses[0:4]) / 4, 3: sum(losses[4:6]) / 2}
    assert len(losses) == 6 and eager_run.logged == expected  # exactly, not approximately
    log_lines = re.findall(r"step (\d+)/3 loss ([0-9.]+)", (workdir_module / "exps/eager/train.log").read_text())
    assert dict(log_lines) == {str(step): f"{loss:.5f}" for step, loss in expected.items()}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((workdir_module / "exps/eager/tblog").rglob("events.*")).parent)).Reload()
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


class TwoLayers(torch.nn.Module):
    """A module of this file: dynamo traces it (it skips torch.nn's own classes such as Sequential)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(x)))


def test_compile_denoiser_compiles_in_place_one_graph_per_shape_and_eager_runs_none():
    import torch._dynamo

    from hcpdiff.train.compile import CompileSpec, compile_denoiser, eager

    graphs = []

    def counting_backend(graph_module, example_inputs):  # what torch.compile hands a backend: count, run as traced
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = TwoLayers()
    keys = list(model.state_dict())
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        compile_denoiser(model, CompileSpec(backend=counting_backend), shapes=3)
        assert torch._dynamo.config.recompile_limit == 4  # the data's shapes and a spare
        assert list(model.state_dict()) == keys and model._compiled_call_impl is not None  # in place, same keys
        model(torch.randn(2, 4)).sum().backward()
        model(torch.randn(2, 4))
        assert len(graphs) == 1
        model(torch.randn(3, 4))  # another batch shape: its own graph (dynamic false), not a dynamic one
        assert len(graphs) == 2
        with eager():
            model(torch.randn(5, 4))
        assert len(graphs) == 2
    torch._dynamo.reset()


@pytest.mark.skipif(not os.environ.get("HCP_TEST_COMPILE"), reason="torch.compile of the tiny U-Net: 30-60 s on 2 "
                    "quiet cores (dynamo tracing); set HCP_TEST_COMPILE=1")
def test_compiled_denoiser_trains_like_the_eager_one_and_previews(eager_run, workdir_module, tiny_model):
    # backend eager: dynamo captures the LoRA U-Net's graphs (the part that decides whether the module compiles in place,
    # keeps its keys and previews eagerly) and runs them as they are; kernel generation (inductor) takes minutes on
    # this tiny U-Net on 2 CPU cores, and tools/bench_train_step.py --compile / tools/gpu_throughput.sh run it
    from safetensors.torch import load_file

    compiled = run_tiny(workdir_module, tiny_model, str(workdir_module / "exps/compiled"),
                        "train.compile={backend: eager}")
    assert compiled.parts.unet._compiled_call_impl is not None  # compiled in place, not wrapped
    folders = {name: workdir_module / "exps" / name / "ckpts" for name in ("eager", "compiled")}
    for name in ("unet-3.safetensors", "unet-ema-3.safetensors"):
        eager_ckpt, compiled_ckpt = (load_file(folder / name) for folder in folders.values())
        assert compiled_ckpt.keys() == eager_ckpt.keys()
        assert all(torch.allclose(compiled_ckpt[key], eager_ckpt[key], atol=1e-5) for key in eager_ckpt)
    assert compiled.micro_losses == pytest.approx(eager_run.micro_losses, rel=1e-4)
    assert any((workdir_module / "exps/compiled/preview").iterdir())


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
