"""Synthetic native LoRA states for the conversion tests, the weight change each layer of one adds, and one through
lora_convert's --to_webui / --from_webui as a user converts it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from hcpdiff.lora.state_io import layer_states


def random_lora(model: torch.nn.Module, keep, seed: int) -> dict[str, torch.Tensor]:
    """A native LoRA on every Linear `keep(name)` accepts, ranks 2-4 and alphas 1-4 varying by layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        if keep(name):
            rank = 2 + i % 3
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            state[f"{name}.alpha"] = torch.tensor(float(1 + i % 4))
    return state


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: alpha / rank * B @ A}: what each LoRA layer adds to its weight."""
    return {layer: float(p[".alpha"]) / p[".lora_A.weight"].shape[0] * p[".lora_B.weight"] @ p[".lora_A.weight"]
            for layer, p in layer_states(state).items()}


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: weight} of every Linear in `model`."""
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def webui_delta(written: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """alpha / rank * up @ down: what `layer` of a webui (kohya-style) LoRA state adds to its weight."""
    down, up = written[f"{layer}.lora_down.weight"], written[f"{layer}.lora_up.weight"]
    return float(written[f"{layer}.alpha"]) / down.shape[0] * up @ down


def peft_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: B @ A} of a diffusers LoRA state (`transformer.<layer>.lora_A/B.weight`, alpha folded in)."""
    return {key.removeprefix("transformer.").removesuffix(".lora_A.weight"):
            state[key.replace(".lora_A.", ".lora_B.")] @ tensor for key, tensor in state.items()
            if key.endswith(".lora_A.weight")}


def convert(run: Callable, workdir: Path, *args: str) -> str:
    """The stderr of `python -m hcpdiff.tools.lora_convert *args` run in `workdir` (which succeeds)."""
    done = run(["-m", "hcpdiff.tools.lora_convert", *args], cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def to_webui(run: Callable, workdir: Path, native: dict[str, torch.Tensor], family: str
             ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(its tensors, its metadata, lora_convert's stderr) of `workdir / "webui.safetensors"`: `native` saved as a
    `family` transformer LoRA (transformer-10.safetensors) and converted by --to_webui."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hcpdiff.lora.state_io import lora_metadata, save_lora

    lora, webui = workdir / "transformer-10.safetensors", workdir / "webui.safetensors"
    save_lora(lora, native, lora_metadata("transformer", "tiny", [], 10, family=family))
    stderr = convert(run, workdir, "--to_webui", "--lora_path", str(lora), "--dump_path", str(webui))
    with safe_open(webui, "pt") as file:
        metadata = file.metadata()
    return load_file(webui), metadata, stderr


def from_webui_deltas(run: Callable, workdir: Path) -> dict[str, torch.Tensor]:
    """The `deltas` of the LoRA --from_webui reads back from `workdir / "webui.safetensors"` (into `workdir /
    "back"`)."""
    from safetensors.torch import load_file

    back = workdir / "back"
    convert(run, workdir, "--from_webui", "--lora_path", str(workdir / "webui.safetensors"), "--dump_path", str(back))
    (restored_file,) = sorted(back.glob("transformer-*.safetensors"))
    return deltas(load_file(restored_file))
