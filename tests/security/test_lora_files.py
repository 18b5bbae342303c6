"""LoRA files: a conversion never overwrites its input; an inconsistent file is one line naming file and layer.

Refused runs go through the entry points in-process (`refuse`: same argv, exit status and stderr); the runs that
convert or render start a process as a user does.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.errors import ModelError
from hcpdiff.lora.state_io import check_lora_state, same_base_model, save_lora

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"  # Linear(64, 64) in the tiny U-Net
SMALL = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=2"]


def layer(rank_a: int = 4, rank_b: int = 4, alpha: float = 2.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"{LAYER}.lora_A.weight": (torch.randn(rank_a, 64, generator=gen) * 0.1).to(dtype),
            f"{LAYER}.lora_B.weight": (torch.randn(64, rank_b, generator=gen) * 0.1).to(dtype),
            f"{LAYER}.alpha": torch.tensor(alpha)}


def write_lora(path: Path, state: dict[str, torch.Tensor], base_model: str) -> Path:
    save_lora(path, state, {"part": "unet", "base_model": base_model, "step": "1", "groups": "[]"})
    return path


def convert(run, cwd: Path, *args: str):
    return run(["-m", "hcpdiff.tools.lora_convert", *args], cwd=cwd)


@pytest.fixture
def refuse(cli_in_process):
    """Runs a command expected to stop at an error, in-process (the conversions that succeed start a process)."""
    return cli_in_process


# --- item 2: a conversion never overwrites its source --------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["--to_webui", "--to_diffusers"])
def test_dump_path_equal_to_an_input_is_refused_and_the_input_kept(refuse, tmp_path, tiny_model, mode, one_error_line):
    source = write_lora(tmp_path / "unet-1.safetensors", layer(), str(tiny_model))
    before = source.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(source)
    for dump in (str(source), "unet-1.safetensors", "./sub/../unet-1.safetensors", "link.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        error = one_error_line(convert(refuse, tmp_path, mode, "--lora_path", str(source), "--dump_path", dump))
        assert "--dump_path" in error and "--lora_path" in error and "unet-1.safetensors" in error
        assert source.read_bytes() == before
    te = tmp_path / "te.safetensors"
    save_lora(te, {}, {"part": "text_encoder", "base_model": "", "step": "1", "groups": "[]"})
    te_before = te.read_bytes()
    error = one_error_line(convert(refuse, tmp_path, mode, "--lora_path", str(source), "--lora_path_TE", str(te),
                                   "--dump_path", "te.safetensors"))
    assert "--lora_path_TE" in error and te.read_bytes() == te_before
    os.link(source, tmp_path / "hard.safetensors")
    one_error_line(convert(refuse, tmp_path, mode, "--lora_path", str(source), "--dump_path", "hard.safetensors"))
    assert source.read_bytes() == before


@pytest.mark.e2e
def test_a_different_dump_path_still_converts(cli_in_process, tmp_path, tiny_model):
    source = write_lora(tmp_path / "unet-1.safetensors", layer(), str(tiny_model))
    done = convert(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(source), "--dump_path", "webui.safetensors")
    assert done.returncode == 0, done.stderr
    assert len(load_file(tmp_path / "webui.safetensors")) == 3


# --- item 5: inconsistent files ------------------------------------------------------------------------------------

BAD_STATES = {
    "rank mismatch": (layer(rank_a=8, rank_b=4), "disagree on the rank"),
    "integer dtype": (layer(dtype=torch.int32), "dtype int32"),
    "nan alpha": (layer(alpha=float("nan")), "NaN or inf"),
    "inf weights": ({**layer(), f"{LAYER}.lora_B.weight": torch.full((64, 4), float("inf"))}, "NaN or inf"),
    "missing lora_B": ({k: v for k, v in layer().items() if "lora_B" not in k}, "lack"),
    "alpha not a scalar": ({**layer(), f"{LAYER}.alpha": torch.ones(3)}, "not one number"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_inconsistent_state_names_file_and_layer(name):
    state, needle = BAD_STATES[name]
    with pytest.raises(ModelError) as info:
        check_lora_state(state, "x.safetensors")
    message = str(info.value)
    assert message.startswith("LoRA file 'x.safetensors'") and LAYER in message and needle in message
    assert "\n" not in message


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["rank mismatch", "integer dtype", "nan alpha", "missing lora_B"])
def test_lora_convert_refuses_an_inconsistent_file_and_writes_nothing(refuse, tmp_path, tiny_model, name,
                                                                      one_error_line):
    source = write_lora(tmp_path / "bad.safetensors", BAD_STATES[name][0], str(tiny_model))
    error = one_error_line(convert(refuse, tmp_path, "--to_webui", "--lora_path", str(source),
                                   "--dump_path", "out.safetensors"))
    assert "bad.safetensors" in error and LAYER in error
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.e2e
def test_lora_convert_refuses_layers_its_base_model_lacks(refuse, tmp_path, tiny_model, one_error_line):
    state = {key.replace(LAYER, "down_blocks.7.attn.to_k"): value for key, value in layer().items()}
    source = write_lora(tmp_path / "alien.safetensors", state, str(tiny_model))
    error = one_error_line(convert(refuse, tmp_path, "--to_webui", "--lora_path", str(source),
                                   "--dump_path", "out.safetensors"))
    assert "alien.safetensors" in error and "down_blocks.7.attn.to_k" in error
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["rank mismatch", "nan alpha", "unknown layer"])
def test_visualizer_refuses_an_inconsistent_lora_before_rendering(refuse, workdir, tiny_model, name, one_error_line):
    if name == "unknown layer":
        state = {key.replace(LAYER, "down_blocks.7.attn.to_k"): value for key, value in layer().items()}
    else:
        state = BAD_STATES[name][0]
    source = write_lora(workdir / "bad.safetensors", state, str(tiny_model))
    result = refuse(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/t2i_lora.yaml", f"pretrained_model={tiny_model}",
                     f"lora_path={source}", "prompt=a cat", "save.out_dir=imgs", *SMALL], cwd=workdir)
    error = one_error_line(result)
    assert "bad.safetensors" in error and ("down_blocks.7.attn.to_k" in error or LAYER in error)
    assert not list(workdir.glob("imgs/*.png"))


@pytest.mark.e2e
def test_visualizer_warns_once_when_the_lora_was_trained_on_another_model(cli_in_process, workdir, tiny_model):
    source = write_lora(workdir / "other.safetensors", layer(), "someone/another-model")
    result = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/t2i_lora.yaml", f"pretrained_model={tiny_model}",
                  f"lora_path={source}", "prompt=a cat", "save.out_dir=imgs", *SMALL], cwd=workdir)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "was trained on" in line]
    assert len(warnings) == 1 and "someone/another-model" in warnings[0] and "other.safetensors" in warnings[0]
    same = write_lora(workdir / "same.safetensors", layer(), str(tiny_model))
    result = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/t2i_lora.yaml", f"pretrained_model={tiny_model}",
                  f"lora_path={same}", "prompt=a cat", "save.out_dir=imgs", *SMALL], cwd=workdir)
    assert result.returncode == 0 and "was trained on" not in result.stderr


@pytest.mark.parametrize("lora_base, model, same", [
    ("runwayml/stable-diffusion-v1-5", "/models/stable-diffusion-v1-5", True),
    ("/data/models/Stable-Diffusion-v1-5/", "runwayml/stable-diffusion-v1-5", True),
    ("models/my-finetune.safetensors", "other/place/my-finetune", True),
    ("", "anything", True),
    ("stabilityai/stable-diffusion-xl-base-1.0", "runwayml/stable-diffusion-v1-5", False),
])
def test_base_model_comparison_by_folder_name_or_hub_id(lora_base, model, same):
    assert same_base_model(lora_base, model) is same
