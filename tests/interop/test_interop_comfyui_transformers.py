"""ComfyUI's own key mapping (comfy/lora.py model_lora_keys_unet: every `diffusion_model.` weight under its dotted path
and as `lora_unet_` + the path with underscores) and weight patching (calculate_weight) on hcpdiff's --to_webui files
of the transformer families whose ComfyUI model is an original layout (Ideogram 4, Qwen-Image 2.1, FLUX.2), read from
the checkout named by HCP_COMFYUI_DIR. ComfyUI's model is stood in for by its state dict: the tiny diffusers
transformer's weights under the original names (the tools tests check those against diffusers' converters and
ComfyUI's model code); ComfyUI must find every key of the file and patch each weight to hcpdiff's merge."""
from __future__ import annotations

import importlib
import logging
import sys

import pytest
import torch

from hcpdiff.families import family_named
from hcpdiff.lora.lycoris_format import webui_tensors

from interop_helpers import checkout, comfy_imported

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
from lora_states import deltas, random_lora  # noqa: E402


@pytest.fixture(scope="module")
def comfy():
    """comfy.lora from the checkout; model_management / model_base stand in for ComfyUI's heavy modules (any model
    class the key map asks about is one this stand-in model is not)."""
    root = checkout("HCP_COMFYUI_DIR", "comfy/lora.py")
    with comfy_imported(root):
        yield importlib.import_module("comfy.lora")


class ComfyModel:
    """What model_lora_keys_unet reads of a ComfyUI model: its state dict keys and a config without U-Net blocks."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.model_config = type("ModelConfig", (), {"unet_config": {}})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def build(family: str) -> tuple[torch.nn.Module, object]:
    """The tiny transformer of `family` and its lookup (diffusers layer, native state) -> (FusedLayer, index)."""
    torch.manual_seed(0)
    if family == "ideogram4":
        from hcpdiff.families.ideogram4 import original_layer
        from hcpdiff.tools.tiny_ideogram4 import build_ideogram4_transformer

        return build_ideogram4_transformer(), lambda layer, state: original_layer(layer)
    if family == "qwen_image_21":
        from hcpdiff.families.qwen_image_21 import original_layer
        from hcpdiff.tools.tiny_qwen_image_21 import build_transformer

        return build_transformer(), original_layer
    from hcpdiff.families.flux2 import bfl_layer
    from hcpdiff.tools.tiny_flux2 import build_flux2_transformer

    return build_flux2_transformer(), lambda layer, state: bfl_layer(layer)


def original_weights(weights: dict[str, torch.Tensor], lookup, state) -> dict[str, torch.Tensor]:
    """{`diffusion_model.<original layer>.weight`: its weight} of diffusers Linear weights, pieces stacked."""
    from hcpdiff.lora.fused_layout import swap_halves

    out = {}
    for name in weights:
        layer, _ = lookup(name, state)
        stacked = torch.cat([weights[piece] for piece in layer.pieces])
        out[f"diffusion_model.{layer.name}.weight"] = swap_halves(stacked) if layer.swap_halves else stacked
    return out


@pytest.mark.parametrize("family", ["ideogram4", "qwen_image_21", "flux2_klein"])
def test_comfyui_loads_every_key_and_merges_as_hcpdiff(comfy, family, caplog):
    transformer, lookup = build(family)
    native = random_lora(transformer, lambda name: True, seed=3)
    by_layer = family_named(family).native_to_webui({"transformer": native})["transformer"]
    webui = {layer + suffix: tensor for layer, parts in by_layer.items()
             for suffix, tensor in webui_tensors(parts).items()}
    weights = {name: module.weight.detach().float() for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear)}
    changes = deltas(native)
    base = original_weights(weights, lookup, native)
    merged = original_weights({name: weight + changes[name] for name, weight in weights.items()}, lookup, native)

    key_map: dict[str, str] = {}
    comfy.model_lora_keys_unet(ComfyModel(base), key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.load_lora(webui, key_map)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]  # every key found a weight
    assert set(patches) == set(base) and len(patches) == len(by_layer)
    for key, patch in patches.items():
        got = comfy.calculate_weight([(1.0, patch, 1.0, None, None)], base[key].clone(), key)
        assert torch.allclose(got, merged[key], atol=2e-5, rtol=1e-4), key
