"""A1111's own LoRA extension (extensions-builtin/Lora: networks.load_network's key matching, network_apply_weights,
the lora / hada / lokr modules, NetworkOnDisk.detect_version) on hcpdiff's --to_webui files, read from the checkout
named by HCP_A1111_DIR. Its model is built the way A1111 names it: the U-Net in the original layout (named here by
kohya's conversion map, not by hcpdiff's), CLIP-L from transformers, SDXL's OpenCLIP bigG with torch
MultiheadAttention."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from interop_helpers import checkout, layer_weight, load_part, restore_modules, stub_modules
from kohya_sd_scripts_naming import kohya_sdxl_module_name

A1111_MODULES = ("network", "networks", "network_lora", "network_hada", "network_lokr", "lyco_helpers")


@pytest.fixture(scope="module")
def a1111():
    """A1111's `network` and `networks` modules; its `modules.*` (UI, model loading, hashing) are stand-ins."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    root = checkout("HCP_A1111_DIR", "extensions-builtin/Lora/networks.py")

    def read_metadata(filename: str) -> dict[str, str]:
        with safe_open(filename, "pt") as opened:
            return dict(opened.metadata() or {})

    stand_ins = {
        "modules": {}, "modules.models": {}, "modules.models.sd3": {},
        "modules.models.sd3.mmdit": {"QkvLinear": type("QkvLinear", (nn.Linear,), {})},
        "modules.shared": {"sd_model": None, "opts": types.SimpleNamespace(lora_preferred_name="Alias from file",
                                                                           lora_functional=False)},
        "modules.devices": {"cpu": torch.device("cpu"), "device": torch.device("cpu"), "dtype": torch.float32},
        "modules.sd_models": {"read_state_dict": lambda filename: load_file(filename),
                              "read_metadata_from_safetensors": read_metadata},
        "modules.errors": {"display": lambda error, message: (_ for _ in ()).throw(error)},
        "modules.scripts": {}, "modules.sd_hijack": {},
        "modules.cache": {"cached_data_for_file": lambda subsection, title, filename, func: func()},
        "modules.hashes": {"sha256_from_cache": lambda *args, **kwargs: None, "sha256": lambda *args, **kwargs: None},
    }
    before = stub_modules(stand_ins)
    for name in stand_ins:  # `import modules.models.sd3.mmdit` reads the chain of attributes
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    lora_dir = str(root / "extensions-builtin" / "Lora")
    sys.path.insert(0, lora_dir)
    try:
        yield {"network": importlib.import_module("network"), "networks": importlib.import_module("networks"),
               "shared": sys.modules["modules.shared"]}
    finally:
        sys.path.remove(lora_dir)
        for name in A1111_MODULES:
            sys.modules.pop(name, None)
        restore_modules(before)


def mount(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Place `module` at a dotted path under `root`, creating plain containers on the way."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


def open_clip_attention(attention: nn.Module, heads: int) -> nn.MultiheadAttention:
    """OpenCLIP's attention (what A1111 runs for SDXL's second encoder) holding a transformers CLIPAttention's weights."""
    width = attention.q_proj.in_features
    mha = nn.MultiheadAttention(width, heads)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        mha.out_proj.weight.copy_(attention.out_proj.weight)
    return mha


def a1111_model(case) -> tuple[types.SimpleNamespace, dict[str, nn.Module], dict[str, nn.MultiheadAttention]]:
    """A1111's sd_model for this case: fresh parts mounted under A1111's (compvis) names; also the fresh parts and
    the te2 attentions as MultiheadAttention by encoder layer name."""
    parts = {part: load_part(case.model_dir, part) for part in case.native}
    model = nn.Module()
    for name, module in parts["unet"].named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            original = kohya_sdxl_module_name(name)
            assert original is not None, name
            mount(model, f"diffusion_model.{original}", module)
    clip_l = nn.Module()
    for name, module in parts["text_encoder"].named_modules():
        if isinstance(module, nn.Linear):
            mount(clip_l, f"transformer.text_model.{name}", module)
    attentions = {}
    if case.family == "sdxl":
        bigg = nn.Module()
        encoder = parts["text_encoder_2"]
        for index, layer in enumerate(encoder.text_model.encoder.layers):
            attentions[f"text_model.encoder.layers.{index}.self_attn"] = open_clip_attention(
                layer.self_attn, encoder.config.num_attention_heads)
            mount(bigg, f"model.transformer.resblocks.{index}.attn", attentions[f"text_model.encoder.layers.{index}.self_attn"])
            mount(bigg, f"model.transformer.resblocks.{index}.mlp.c_fc", layer.mlp.fc1)
            mount(bigg, f"model.transformer.resblocks.{index}.mlp.c_proj", layer.mlp.fc2)
        embedders = [types.SimpleNamespace(wrapped=clip_l), types.SimpleNamespace(wrapped=bigg)]
        sd_model = types.SimpleNamespace(is_sdxl=True, model=model,
                                         conditioner=types.SimpleNamespace(embedders=embedders))
    else:
        sd_model = types.SimpleNamespace(is_sdxl=False, model=model, cond_stage_model=types.SimpleNamespace(wrapped=clip_l))
    return sd_model, parts, attentions


def load_in_a1111(a1111, case, path: Path):
    """A1111's load_network of `path` on a fresh model, its weights applied as its Linear / Conv2d / MultiheadAttention
    forwards apply them; returns (network, parts, attentions)."""
    sd_model, parts, attentions = a1111_model(case)
    a1111["shared"].sd_model = sd_model
    networks, network = a1111["networks"], a1111["network"]
    networks.assign_network_names_to_compvis_modules(sd_model)
    net = networks.load_network("hcpdiff", network.NetworkOnDisk("hcpdiff", str(path)))
    networks.loaded_networks[:] = [net]
    in_attention = {id(m.out_proj) for m in attentions.values()}  # MultiheadAttention uses out_proj's weight itself
    with torch.no_grad():  # as A1111 renders
        for module in sd_model.network_layer_mapping.values():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and id(module) not in in_attention:
                networks.network_apply_weights(module)
    networks.loaded_networks.clear()
    return net, parts, attentions


def test_a1111_loads_every_key_and_merges_as_hcpdiff(a1111, case) -> None:
    if case.kind == "dora":
        pytest.skip("--to_webui refuses DoRA: A1111 reads dora_scale per input column only (this copy: not at all)")
    net, parts, attentions = load_in_a1111(a1111, case, case.webui_path)
    loaded = {module.network_key.split(".")[0] for module in net.modules.values()}
    written = {key.split(".")[0] for key in case.webui}
    # OpenCLIP keeps its projection as a bare parameter, which A1111's LoRA cannot reach (ComfyUI reads it). SD1 files
    # keep kohya's diffusers-style names, which A1111 renumbers with SD1.5's block layout: the tiny U-Net's first up
    # block has attention (SD1.5's has none), so its upsampler lands elsewhere; on SD1.5 itself every name converts
    # (test_a1111_converts_every_full_size_sd15_name)
    assert written - loaded == ({"lora_te2_text_projection"} if case.family == "sdxl"
                                else {"lora_unet_up_blocks_0_upsamplers_0_conv"})
    mismatched = []
    for part in case.native:
        for layer in case.layers(part):
            want = layer_weight(case.merged[part], layer)
            attention, _, projection = layer.rpartition(".")
            if part == "text_encoder_2" and attention in attentions:
                mha = attentions[attention]
                width = mha.embed_dim
                index = "qkv".find(projection[0])
                got = mha.out_proj.weight if projection == "out_proj" else mha.in_proj_weight[index * width:(index + 1) * width]
            elif layer == "text_projection" or (case.family == "sd" and layer == "up_blocks.0.upsamplers.0.conv"):
                continue  # not loaded (above)
            else:
                got = parts[part].get_submodule(layer).weight
            if not torch.allclose(got.detach().float(), want, atol=2e-5, rtol=1e-4):
                mismatched.append(f"{part} {layer}")
    assert not mismatched, mismatched[:5]


def test_a1111_files_the_lora_under_its_model(a1111, case) -> None:
    if case.kind == "dora":
        pytest.skip("the DoRA file here is written without --to_webui (which refuses DoRA), so without metadata")
    on_disk = a1111["network"].NetworkOnDisk("hcpdiff", str(case.webui_path))
    assert on_disk.sd_version.name == ("SDXL" if case.family == "sdxl" else "SD1")


def test_a1111_drops_sdxl_layers_under_diffusers_style_names(a1111, case, tmp_path) -> None:
    """Why --to_webui --sdxl writes the original layout: A1111's diffusers-name formula assumes SD1.5's blocks."""
    if case.family != "sdxl" or case.kind != "lora":
        pytest.skip("SDXL LoRA only")
    from safetensors.torch import save_file

    from hcpdiff.lora import load_lora
    from hcpdiff.lora.webui_format import SDXL_WEBUI_PREFIX, native_to_webui

    diffusers_style = native_to_webui(load_lora(case.native["unet"])[0], "unet", SDXL_WEBUI_PREFIX)
    save_file(diffusers_style, str(tmp_path / "diffusers_style.safetensors"))
    net, _, _ = load_in_a1111(a1111, case, tmp_path / "diffusers_style.safetensors")
    loaded = {module.network_key.split(".")[0] for module in net.modules.values()}
    dropped = {key.split(".")[0] for key in diffusers_style} - loaded
    assert {"lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_linear_1",
            "lora_unet_add_embedding_linear_2"} <= dropped


def test_a1111_converts_every_full_size_sd15_name(a1111) -> None:
    """On SD1.5's own layout A1111's diffusers-name formula places every layer where hcpdiff's original-layout map does."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from hcpdiff.lora.ldm_names import ldm_unet_names

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({})  # diffusers' defaults are SD1.5's U-Net
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ours = ldm_unet_names(unet, layers)
    convert = a1111["networks"].convert_diffusers_name_to_compvis
    theirs = {layer: convert("lora_unet_" + layer.replace(".", "_"), False) for layer in layers}
    assert theirs == {layer: "diffusion_model_" + ours[layer].replace(".", "_") for layer in layers}
