"""kohya sd-scripts' own naming (vendored in kohya_sd_scripts_naming.py): the SDXL original-layout names of the
full-size U-Net, and a file named as create_network names it converting to native and back to the same file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop_helpers import load_part
from kohya_sd_scripts_naming import (LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_TEXT_ENCODER1, LORA_PREFIX_TEXT_ENCODER2,
                                     LORA_PREFIX_UNET, TEXT_ENCODER_TARGET_REPLACE_MODULE, UNET_TARGET_REPLACE_MODULE,
                                     UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, kohya_lora_names, kohya_sdxl_module_name)


@pytest.fixture
def cli(cli_in_process):
    """lora_convert runs in-process here (same argv, exit status and output); test_lora_convert.py starts a process."""
    return cli_in_process


def test_full_size_sdxl_original_names_equal_kohyas_conversion_map() -> None:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from hcpdiff.lora.ldm_names import SDXL_UNET_CONFIG, ldm_unet_names

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ours = ldm_unet_names(unet, layers)
    theirs = {layer: kohya_sdxl_module_name(layer) for layer in layers}
    assert len(layers) > 700 and ours == theirs


def kohya_file(model_dir: Path, family: str, path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file keyed as kohya's create_network (conv_dim set, so LoCon too) names the layers of this model,
    with random weights and per-layer alphas, saved to `path`."""
    sdxl = family == "sdxl"
    names: dict[str, tuple[str, torch.nn.Module]] = {}
    unet = load_part(model_dir, "unet")
    rename = kohya_sdxl_module_name if sdxl else (lambda name: name)  # kohya's SD1 U-Net keeps diffusers' names
    for layer, name in kohya_lora_names(unet, LORA_PREFIX_UNET, UNET_TARGET_REPLACE_MODULE
                                        + UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, rename).items():
        names[name] = (layer, unet.get_submodule(layer))
    encoders = [("text_encoder", LORA_PREFIX_TEXT_ENCODER1 if sdxl else LORA_PREFIX_TEXT_ENCODER)]
    if sdxl:
        encoders.append(("text_encoder_2", LORA_PREFIX_TEXT_ENCODER2))
    for part, prefix in encoders:
        encoder = load_part(model_dir, part)
        # kohya runs transformers 4's CLIPTextModel, whose layers sit under text_model.
        to_v4 = (lambda name: name) if part == "text_encoder_2" else (lambda name: "text_model." + name)
        for layer, name in kohya_lora_names(encoder, prefix, TEXT_ENCODER_TARGET_REPLACE_MODULE, to_v4).items():
            names[name] = (layer, encoder.get_submodule(layer))
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, (_, module) in names.items():
        rank = 4
        if isinstance(module, torch.nn.Conv2d):  # kohya: down is the layer's kernel, up a 1x1 conv
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(float(torch.randint(1, 8, (1,), generator=generator)))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return tensors


def test_a_file_named_by_kohyas_create_network_converts_back_exactly(cli, tmp_path, tiny_model, tiny_sdxl) -> None:
    for family, model_dir in (("sd", tiny_model), ("sdxl", tiny_sdxl)):
        sdxl = ["--sdxl"] if family == "sdxl" else []
        original = kohya_file(model_dir, family, tmp_path / f"kohya_{family}.safetensors")
        done = cli(["-m", "hcpdiff.tools.lora_convert", "--from_webui", *sdxl, "--lora_path", f"kohya_{family}.safetensors",
                    "--dump_path", f"native_{family}", "--model", str(model_dir)], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        native = {p.name.split("-")[0]: p for p in (tmp_path / f"native_{family}").iterdir()}
        assert set(native) == ({"unet", "text_encoder", "text_encoder_2"} if sdxl else {"unet", "text_encoder"})
        args = ["--lora_path", str(native["unet"]), "--lora_path_TE", str(native["text_encoder"])]
        if sdxl:
            args += ["--lora_path_TE2", str(native["text_encoder_2"])]
        done = cli(["-m", "hcpdiff.tools.lora_convert", "--to_webui", *sdxl, *args, "--dump_path",
                    f"again_{family}.safetensors"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        again = load_file(str(tmp_path / f"again_{family}.safetensors"))
        assert again.keys() == original.keys(), sorted(set(again) ^ set(original))[:4]
        assert all(torch.equal(again[k], original[k]) for k in original)
