"""Memory options: activation offload, selective checkpointing and block swap train exactly what the plain run
trains; the start-of-run
memory table lists every part; an out-of-memory error is one line naming the step; a U-Net refuses block swap.

On a CPU both "devices" are the CPU: offload's hooks run and move nothing, block swap copies each swapped block's
weights into fresh tensors before it runs and points them back at the CPU masters afterwards (the GPU's placement
and its figures are measured on a GPU, not here)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from hcpdiff.families import family_named
from hcpdiff.models.block_swap import BlockSwapper
from hcpdiff.models.checkpointing import checkpoint_blocks
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.memory import activations_offloaded, lowering_options, memory_table


# ------------------------------------------------------------------------------------------- units
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.lora = nn.Linear(8, 8, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.frozen(hidden)) + self.lora(hidden)


class Stack(nn.Module):
    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.checkpointing = checkpointing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():  # as diffusers' _gradient_checkpointing_func
                hidden = checkpoint(block.__call__, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        return hidden


class PoisonedParking(BlockSwapper):
    """A parked block's parameters read NaN: any forward or backward that ran on a parked block shows."""

    def park(self, index: int) -> None:
        super().park(index)
        for param, master in self.masters[index]:
            param.data = torch.full_like(master, float("nan"))


def frozen_but_lora(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(".lora." in name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_blocks_are_resident_whenever_they_run_and_gradients_are_exact(checkpointing):
    torch.manual_seed(0)
    plain = Stack(checkpointing)
    frozen_but_lora(plain)
    swapping = copy.deepcopy(plain)
    swapper = PoisonedParking(swapping, list(swapping.blocks), 3, torch.device("cpu"))
    hidden = torch.randn(2, 8)
    for _ in range(2):  # the second step starts from the first's parked state
        plain(hidden).square().sum().backward()
        loss = swapping(hidden).square().sum()
        loss.backward()
        assert torch.isfinite(loss)
    for (name, ours), theirs in zip(swapping.named_parameters(), plain.parameters()):
        if ours.requires_grad:
            assert torch.equal(ours.grad, theirs.grad), name
    assert [swapper.resident(i) for i in range(4)][0]  # the block not swapped never leaves
    with torch.no_grad():  # a preview's forward: loads and parks as it goes
        assert torch.equal(swapping(hidden), plain(hidden))
    assert not any(swapper.resident(i) for i in swapper.swapped)


def test_offload_hooks_run_and_change_no_gradient():
    torch.manual_seed(0)
    plain = Stack(True)
    frozen_but_lora(plain)
    offloaded = copy.deepcopy(plain)
    hidden = torch.randn(2, 8)
    plain(hidden).square().sum().backward()
    with activations_offloaded(offloaded, torch.device("cpu")):
        loss = offloaded(hidden).square().sum()
    loss.backward()
    for ours, theirs in zip(offloaded.parameters(), plain.parameters()):
        if ours.requires_grad:
            assert torch.equal(ours.grad, theirs.grad)


def test_selective_checkpointing_recomputes_only_its_blocks_and_changes_no_gradient():
    """{blocks: N}: the first N blocks run their forward again in backward, the others once; gradients are those of
    the plain stack (and of full checkpointing); without grad (a preview) nothing is checkpointed."""
    torch.manual_seed(0)
    plain = Stack(False)
    frozen_but_lora(plain)
    selective = copy.deepcopy(plain)
    checkpoint_blocks(list(selective.blocks)[:2])
    calls = [0] * 4
    for index, block in enumerate(selective.blocks):
        block.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
        block.frozen.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 10))
    hidden = torch.randn(2, 8)
    plain(hidden).square().sum().backward()
    selective(hidden).square().sum().backward()
    assert calls == [21, 21, 11, 11]  # the inner layer ran twice in the two checkpointed blocks
    for ours, theirs in zip(selective.parameters(), plain.parameters()):
        if ours.requires_grad:
            assert torch.equal(ours.grad, theirs.grad)
    assert "lora.weight" in dict(selective.blocks[0].named_parameters())  # state-dict names unchanged
    with torch.no_grad():
        assert torch.equal(selective(hidden), plain(hidden))


def test_lowering_options_follow_the_current_settings():
    assert lowering_options(checkpointing=False, blocks_to_swap=0, swappable=57, batch_size=4,
                            latents_cached=False) == ["model.gradient_checkpointing=true", "model.blocks_to_swap=28",
                                                      "a smaller data.<dataset>.batch_size"]
    assert lowering_options(checkpointing="offload", blocks_to_swap=0, swappable=0, batch_size=1,
                            latents_cached=False) == ["a smaller data.<dataset>.bucket.target_area",
                                                      "data.<dataset>.cache_latents=true"]


def test_memory_table_has_a_row_per_part_and_a_total():
    table = memory_table({"transformer": nn.Linear(4, 4), "text_encoder": None, "scheduler": object()})
    lines = table.splitlines()
    assert lines[0].split() == ["part", "parameters", "trainable", "dtype", "device", "MiB"]
    assert lines[1].split()[:5] == ["transformer", "20", "20", "fp32", "cpu"]
    assert "not in memory" in lines[2] and lines[3].startswith("total") and len(lines) == 4


def test_flux_swaps_its_double_then_single_blocks_and_sd_none():
    flux_like = nn.Module()
    flux_like.transformer_blocks = nn.ModuleList([nn.Linear(1, 1)])
    flux_like.single_transformer_blocks = nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 1)])
    blocks = family_named("flux").swappable_blocks(flux_like)
    assert blocks == [flux_like.transformer_blocks[0], *flux_like.single_transformer_blocks]
    assert family_named("sd").swappable_blocks(flux_like) == []


# ------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def tiny_flux(tiny_models) -> Path:
    return tiny_models("flux")


def flux_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_flux.yaml",
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0", "mixed_precision=bf16",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"32*32"}',
            "data.dataset1.bucket.num_bucket=1", "train.train_steps=2", "train.log_step=1", "transformer_lr=1e-2",
            *extra]


def sd_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=2", "train.log_step=1",
            "data.dataset1.batch_size=1", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
            "train.scheduler.num_warmup_steps=0",
            "mixed_precision=no",  # accelerate's spelling of fp32, which YAML reads as false: accepted as "no"
            *extra]


def logged_losses(exp: Path) -> list[str]:
    return re.findall(r"step \d+/\d+ loss ([\d.]+)", (exp / "train.log").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[key], right[key]) for key in left), f"{a} and {b} differ"
    assert any(float(value.abs().max()) > 0 for key, value in left.items() if ".lora_B." in key)  # trained


@pytest.mark.e2e
def test_flux_offload_and_block_swap_train_exactly_the_plain_run(workdir, tiny_flux, cli_in_process):
    """blocks_to_swap alone (and rendering previews), with gradient_checkpointing offload and with {blocks: 2}: the same
    losses and the same LoRA weights
    after 2 steps as the plain run, bit for bit; the plain run's train.log has the memory table. In bf16: the frozen
    weights are then fresh (aligned) tensors in every run, as block swap's copies are; fp32 weights read from a
    safetensors file sit at unaligned addresses, where CPU matmuls round differently in the last bit."""
    data = make_demo_data(workdir / "data", num=2)
    preview = "previewer={step: 2, prompts: ['a red circle'], width: 32, height: 32, num_inference_steps: 2}"
    runs = {"plain": [], "swap": ["model.blocks_to_swap=3", preview],
            "swap_offload": ["model.blocks_to_swap=2", "model.gradient_checkpointing=offload"],
            "selective_swap": ["model.blocks_to_swap=2", "model.gradient_checkpointing={blocks: 2}"]}
    for name, overrides in runs.items():
        result = cli_in_process(flux_args(tiny_flux, data, f"exp_dir=exps/{name}", *overrides), cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
    exps = workdir / "exps"
    for name in runs:
        assert logged_losses(exps / name) == logged_losses(exps / "plain"), name
        if name != "plain":
            assert_same_weights(exps / "plain/ckpts/transformer-2.safetensors",
                                exps / f"{name}/ckpts/transformer-2.safetensors")
    log = (exps / "plain/train.log").read_text()
    table = log[log.index("model memory:"):].splitlines()[1:7]
    assert table[0].split() == ["part", "parameters", "trainable", "dtype", "device", "MiB"]
    assert [line.split()[0] for line in table[1:]] == ["transformer", "vae", "text_encoder", "text_encoder_2", "total"]
    assert "not in memory" in table[3]  # the text encoders were released: every prompt is cached
    assert re.search(r"step 2/2 loss .* peak RSS \d+ MiB", log)
    assert "2 denoiser blocks swap in from CPU" in (exps / "swap_offload/train.log").read_text()
    # every latent is cached: the VAE waits in CPU memory, and comes back for the previews (rendered with swapped blocks)
    assert "vae in CPU memory for the training loop" in log
    assert len(list((exps / "swap/preview").rglob("*.png"))) == 1


@pytest.mark.e2e
def test_sd_offload_trains_exactly_what_checkpointing_and_the_plain_run_train(workdir, tiny_model, cli_in_process):
    data = make_demo_data(workdir / "data", num=2)
    for value in ("false", "true", "offload"):
        result = cli_in_process(sd_args(tiny_model, data, f"exp_dir=exps/{value}",
                                        f"model.gradient_checkpointing={value}"), cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
    for value in ("true", "offload"):
        assert logged_losses(workdir / f"exps/{value}") == logged_losses(workdir / "exps/false")
        assert_same_weights(workdir / "exps/false/ckpts/unet-2.safetensors",
                            workdir / f"exps/{value}/ckpts/unet-2.safetensors")


@pytest.mark.e2e
def test_out_of_memory_is_one_line_naming_the_step(workdir, tiny_model, cli_in_process, one_error_line, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    real_forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    data = make_demo_data(workdir / "data", num=1)
    result = cli_in_process(sd_args(tiny_model, data, "train.train_steps=3"), cwd=workdir)
    line = one_error_line(result)
    assert line.startswith("error: out of memory at step 2 (peak "), line
    assert "model.gradient_checkpointing=true" in line and "MiB" in line


@pytest.mark.e2e
def test_unet_refuses_blocks_to_swap_in_one_line(workdir, tiny_model, cli_in_process, one_error_line):
    data = make_demo_data(workdir / "data", num=1)
    line = one_error_line(cli_in_process(sd_args(tiny_model, data, "model.blocks_to_swap=2"), cwd=workdir))
    assert line.startswith("error: model.blocks_to_swap: a ") and "no transformer blocks to swap" in line
    line = one_error_line(cli_in_process(sd_args(tiny_model, data, "model.gradient_checkpointing={blocks: 2}"),
                                         cwd=workdir))
    assert line.startswith("error: model.gradient_checkpointing.blocks: a ") and "true" in line


@pytest.mark.parametrize(("value", "wanted"), [("{blocks: 0}", "model.gradient_checkpointing.blocks`: must be >= 1"),
                                               ("{block: 2}", "model.gradient_checkpointing.block`: unknown key"),
                                               ("{blocks: 99}", "has 4 blocks; give at most 4")])
def test_bad_selective_checkpointing_is_one_line(workdir, tiny_flux, cli_in_process, one_error_line, value, wanted):
    data = make_demo_data(workdir / "data", num=1)
    line = one_error_line(cli_in_process(flux_args(tiny_flux, data, f"model.gradient_checkpointing={value}"),
                                         cwd=workdir))
    assert wanted in line, line
