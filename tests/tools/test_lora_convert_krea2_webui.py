"""Krea 2 LoRAs in ComfyUI's names: `diffusion_model.` + the original layout's module paths (`blocks.N.attn.wq`,
`mlp.gate`, `txtfusion.*`, `first`, `tmlp.0`, ...), which diffusers' single-file converter maps back to the diffusers
modules one for one and diffusers' own Krea 2 LoRA converter reads; every layer converts exactly, and --from_webui
gives the LoRA back (from the original names, or from diffusers' names as ComfyUI's Krea 2 aliases take them)."""
from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.families.krea2 import original_name
from hcpdiff.tools.lora_convert import webui_file_family
from hcpdiff.tools.tiny_krea2 import build_krea2_transformer

from lora_states import deltas, from_webui_deltas, linear_weights, random_lora, to_webui

KREA2 = family_named("krea2")


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_krea2_transformer()


def test_original_names_are_what_diffusers_converters_read(transformer):
    """Every Linear's weight under its original name converts back, by diffusers' single-file converter, to the
    diffusers module it came from; a LoRA under those names is what diffusers' Krea 2 LoRA converter reads."""
    weights = linear_weights(transformer)
    original = {f"model.diffusion_model.{original_name(name)}.weight": weight for name, weight in weights.items()}
    converted = convert_krea2_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == {f"{name}.weight" for name in weights}
    assert all(converted[f"{name}.weight"] is weight for name, weight in weights.items())
    lora = {f"diffusion_model.{original_name(name)}.lora_{ab}.weight": torch.zeros(1) for name in weights
            for ab in "AB"}
    assert _convert_non_diffusers_krea2_lora_to_diffusers(lora).keys() == {
        f"transformer.{name}.lora_{ab}.weight" for name in weights for ab in "AB"}


def test_lora_convert_round_trip_through_the_cli(transformer, tmp_path, cli_in_process):
    native = random_lora(transformer, lambda name: "transformer_blocks.1." not in name, seed=2)
    written, metadata, _ = to_webui(cli_in_process, tmp_path, native, "krea2")
    layers = {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in written}
    assert layers == {f"diffusion_model.{original_name(name)}" for name in deltas(native)}
    assert {"diffusion_model.blocks.0.attn.wq", "diffusion_model.blocks.0.mlp.gate", "diffusion_model.first",
            "diffusion_model.txtfusion.layerwise_blocks.1.attn.wo", "diffusion_model.txtfusion.projector"} <= layers
    assert metadata["ss_base_model_version"] == "krea2" and webui_file_family(written, metadata) is KREA2
    assert webui_file_family(written, {}) is KREA2  # by its names alone: no other family claims them
    restored = from_webui_deltas(cli_in_process, tmp_path)
    assert restored.keys() == deltas(native).keys()
    assert all(torch.allclose(restored[name], delta, atol=1e-6) for name, delta in deltas(native).items())


def test_diffusers_names_are_read_as_comfyuis_krea2_aliases(transformer):
    native = random_lora(transformer, lambda name: "transformer_blocks.0.attn" in name or name == "img_in", seed=3)
    webui = {}
    for prefix, (layer, parts) in zip(("transformer.", "diffusion_model.", ""), deltas_parts(native).items()):
        webui.update({f"{prefix}{layer}{suffix}": tensor for suffix, tensor in parts.items()})
    restored = deltas(KREA2.webui_to_native(webui, None)["transformer"])
    assert restored.keys() == set(list(deltas(native))[:3])
    # and kohya's `lora_unet_` + the original path with underscores, as ComfyUI's generic key map reads it
    kohya = {f"lora_unet_{original_name(layer).replace('.', '_')}{suffix}": tensor
             for layer, parts in deltas_parts(native).items() for suffix, tensor in parts.items()}
    assert "lora_unet_blocks_0_attn_wq.lora_down.weight" in kohya and webui_file_family(kohya, {}) is KREA2
    restored = deltas(KREA2.webui_to_native(kohya, None)["transformer"])
    assert all(torch.allclose(restored[name], delta) for name, delta in deltas(native).items())
    fusion = KREA2.webui_to_native({"lora_unet_txtfusion_refiner_blocks_1_mlp_down.alpha": torch.tensor(1.0),
                                    "lora_unet_txtfusion_refiner_blocks_1_mlp_down.lora_down.weight": torch.zeros(1, 2),
                                    "lora_unet_txtfusion_refiner_blocks_1_mlp_down.lora_up.weight": torch.zeros(2, 1)},
                                   None)["transformer"]
    assert {key.rsplit(".lora_", 1)[0] for key in fusion if ".lora_" in key} == {"text_fusion.refiner_blocks.1.ff.down"}


def deltas_parts(native: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: its kohya tensors} of a native state."""
    from hcpdiff.lora.lycoris_format import webui_tensors
    from hcpdiff.lora.state_io import layer_states

    return {layer: webui_tensors(parts) for layer, parts in layer_states(native).items()}


def test_layers_outside_the_layout_and_text_encoder_loras_are_refused():
    with pytest.raises(ModelError, match="Krea 2 text_encoder LoRA has no ComfyUI layout"):
        KREA2.native_to_webui({"transformer": {}, "text_encoder": {}})
    with pytest.raises(ModelError, match="webui LoRA layer 'blocks.0.attn.qkv' names no layer"):
        KREA2.webui_to_native({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.zeros(1, 2)}, None)
