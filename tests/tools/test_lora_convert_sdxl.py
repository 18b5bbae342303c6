"""lora_convert --sdxl: kohya SDXL names that diffusers' StableDiffusionXLPipeline loads with our merge's effect."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.lora import LoraGroupSpec, attach_lora, load_lora, lora_metadata, lora_state_dict, merge_lora, save_lora

UNET_LAYERS = [r"re:.*\.attn.?$", r"re:.*\.ff$", r"re:.*\.proj_in$"]
TE_LAYERS = [r"re:.*mlp\.fc1$"]


def make_native(model, part: str, layers: list[str], path: Path, base_model: Path, seed: int) -> Path:
    """A rank-4 (alpha 2) LoRA with random nonzero weights, saved natively with `base_model` in its metadata."""
    groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=layers, rank=4, alpha=2.0)], part, f"lora_{part}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    save_lora(path, lora_state_dict(model), lora_metadata(part, str(base_model), groups, 1))
    return path


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory, tiny_sdxl: Path) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tmp_path_factory.mktemp("native_xl")
    return {
        "unet": make_native(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"), "unet", UNET_LAYERS,
                            folder / "unet-1.safetensors", tiny_sdxl, 1),
        "text_encoder": make_native(CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"), "text_encoder",
                                    TE_LAYERS, folder / "text_encoder-1.safetensors", tiny_sdxl, 2),
        "text_encoder_2": make_native(
            CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"), "text_encoder_2",
            TE_LAYERS, folder / "text_encoder_2-1.safetensors", tiny_sdxl, 3),
    }


def convert(cli, cwd: Path, *args: str):
    return cli(["-m", "hcpdiff.tools.lora_convert", *args], cwd=cwd)


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=states, added_cond_kwargs=added).sample


def test_sdxl_webui_file_loads_in_diffusers_with_our_merge_effect(cli, tmp_path, tiny_sdxl, sdxl_files):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    webui = tmp_path / "xl.safetensors"
    done = convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(sdxl_files["unet"]),
                   "--lora_path_TE", str(sdxl_files["text_encoder"]), "--lora_path_TE2", str(sdxl_files["text_encoder_2"]),
                   "--dump_path", str(webui))
    assert done.returncode == 0, done.stderr
    keys = set(load_file(webui))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys  # kohya's SDXL layout
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(webui))
    native_unet_layers = {key.rsplit(".lora_", 1)[0] for key in load_lora(sdxl_files["unet"])[0] if ".lora_A." in key}
    loaded = {name for name, module in pipe.unet.named_modules() if isinstance(module, BaseTunerLayer)}
    assert loaded == native_unet_layers  # every U-Net key was consumed, none dropped

    ours = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    base = unet_output(ours)
    merge_lora(ours, load_lora(sdxl_files["unet"])[0])
    want, got = unet_output(ours), unet_output(pipe.unet)
    assert (want - base).abs().mean() > 1e-3
    assert torch.allclose(got, want, atol=1e-5)


def test_sdxl_round_trip_through_webui(cli, tmp_path, tiny_sdxl, sdxl_files):
    webui = tmp_path / "xl.safetensors"
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(sdxl_files["unet"]),
                   "--lora_path_TE2", str(sdxl_files["text_encoder_2"]), "--dump_path", str(webui)).returncode == 0
    back = convert(cli, tmp_path, "--from_webui", "--sdxl", "--lora_path", str(webui), "--dump_path",
                   str(tmp_path / "back"), "--model", str(tiny_sdxl))
    assert back.returncode == 0, back.stderr
    for part in ("unet", "text_encoder_2"):
        original = load_lora(sdxl_files[part])[0]
        restored = load_lora(tmp_path / "back" / f"{part}-xl.safetensors")[0]
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) for k in original)


def test_sdxl_file_without_flag_is_one_clear_error(cli, tmp_path, sdxl_files):
    done = convert(cli, tmp_path, "--to_webui", "--lora_path", str(sdxl_files["unet"]), "--dump_path",
                   str(tmp_path / "x.safetensors"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SDXL" in lines[0] and "--sdxl" in lines[0], done.stderr
