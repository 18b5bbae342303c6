"""ComfyUI's own key mapping (comfy/lora.py model_lora_keys_unet / _clip, load_lora) and weight patching
(calculate_weight) on hcpdiff's --to_webui files, read from the checkout named by HCP_COMFYUI_DIR."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from interop_helpers import checkout, comfy_imported, layer_weight


@pytest.fixture(scope="module")
def comfy():
    """comfy.lora and comfy.utils from the checkout; model_management / model_base (torch-device and model-class
    bookkeeping the key mapping and patching only touch lightly) stand in for ComfyUI's heavy modules."""
    root = checkout("HCP_COMFYUI_DIR", "comfy/lora.py")
    with comfy_imported(root):
        yield {"lora": importlib.import_module("comfy.lora"), "utils": importlib.import_module("comfy.utils")}


def comfy_unet_config(unet) -> dict:
    """The original-layout config ComfyUI's model detection gives this U-Net (blocks, res blocks, transformer depths)."""
    config = unet.config
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block if isinstance(config.layers_per_block, (list, tuple)) else [config.layers_per_block] * levels
    depths = config.transformer_layers_per_block
    depths = list(depths) if isinstance(depths, (list, tuple)) else [depths] * levels
    attention = ["CrossAttn" in block for block in config.down_block_types]
    return {
        "num_res_blocks": list(per_level), "channel_mult": [1] * levels,
        "transformer_depth": [d if a else 0 for d, a, n in zip(depths, attention, per_level) for _ in range(n)],
        "transformer_depth_output": [d if a else 0 for d, a, n in zip(depths, attention, per_level) for _ in range(n + 1)],
        "transformer_depth_middle": depths[-1],
    }


class ComfyModel:
    """What model_lora_keys_* read of a ComfyUI model: its state dict keys (and the U-Net's config)."""

    def __init__(self, state: dict[str, torch.Tensor], unet_config: dict | None = None) -> None:
        self.state = state
        self.model_config = type("ModelConfig", (), {"unet_config": unet_config or {}})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def comfy_names(case, comfy) -> tuple[ComfyModel, ComfyModel, dict[str, tuple[str, str]]]:
    """ComfyUI's U-Net and CLIP models (state dict keys by ComfyUI's own diffusers->original map) and, for each
    ComfyUI weight key, the (part, layer) it is in hcpdiff."""
    unet = case.base["unet"]
    to_original = comfy["utils"].unet_to_diffusers(comfy_unet_config(unet))
    owner: dict[str, tuple[str, str]] = {}
    unet_state = {}
    for key, tensor in unet.state_dict().items():
        if key in to_original:
            unet_state[f"diffusion_model.{to_original[key]}"] = tensor
            owner[f"diffusion_model.{to_original[key]}"] = ("unet", key.removesuffix(".weight"))
    clip_state = {}
    for part, prefix in (("text_encoder", "clip_l.transformer."), ("text_encoder_2", "clip_g.transformer.")):
        if part in case.base:
            for key, tensor in case.base[part].state_dict().items():
                name = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
                clip_state[prefix + name] = tensor
                owner[prefix + name] = (part, key.removesuffix(".weight"))
    return ComfyModel(unet_state, comfy_unet_config(unet)), ComfyModel(clip_state), owner


def test_comfyui_loads_every_key_and_merges_as_hcpdiff(comfy, case, caplog) -> None:
    unet_model, clip_model, owner = comfy_names(case, comfy)
    key_map: dict[str, str] = {}
    comfy["lora"].model_lora_keys_unet(unet_model, key_map)
    comfy["lora"].model_lora_keys_clip(clip_model, key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy["lora"].load_lora(case.webui, key_map)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]  # every key found a weight
    assert {owner[key] for key in patches} == {(part, layer) for part in case.native for layer in case.layers(part)}
    mismatched = []
    for key, patch in patches.items():
        part, layer = owner[key]
        base = layer_weight(case.base[part], layer)
        got = comfy["lora"].calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), key)
        want = layer_weight(case.merged[part], layer)
        if not torch.allclose(got, want, atol=2e-5, rtol=1e-4):
            mismatched.append(f"{part} {layer}")
    if case.kind == "dora":  # why --to_webui refuses DoRA: this ComfyUI normalises dora_scale per input column
        assert len(mismatched) == len(patches)
    else:
        assert not mismatched, mismatched[:5]


def test_newer_comfyui_dora_divides_by_the_base_norm_not_peft(comfy, case) -> None:
    """ComfyUI's weight_adapter (newer) takes an output-row dora_scale but divides by the base weight's norm, where
    peft (hcpdiff) and LyCORIS divide by the adapted weight's: the other reason --to_webui refuses DoRA."""
    if case.kind != "dora":
        pytest.skip("DoRA only")
    try:
        weight_adapter = importlib.import_module("comfy.weight_adapter.base")
    except ImportError:
        pytest.skip("this ComfyUI checkout has no comfy/weight_adapter/base.py")
    from hcpdiff.lora.webui_format import SDXL_WEBUI_PREFIX, WEBUI_PREFIX, webui_name_map
    from hcpdiff.tools.lora_convert import meta_models, unet_ldm_renames

    renames = unet_ldm_renames(meta_models(str(case.model_dir))) if case.family == "sdxl" else None
    names = webui_name_map(case.layers("unet"), "unet", SDXL_WEBUI_PREFIX if case.family == "sdxl" else WEBUI_PREFIX,
                           renames)
    differs = 0
    for layer, name in names.items():
        weight = layer_weight(case.base["unet"], layer)
        down, up = case.webui[f"{name}.lora_down.weight"].float(), case.webui[f"{name}.lora_up.weight"].float()
        diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        got = weight_adapter.weight_decompose(case.webui[f"{name}.dora_scale"].float(), weight.clone(), diff,
                                              float(case.webui[f"{name}.alpha"]) / down.shape[0], 1.0, torch.float32,
                                              lambda a: a)
        differs += not torch.allclose(got, layer_weight(case.merged["unet"], layer), atol=1e-4)
    assert differs == len(names)
