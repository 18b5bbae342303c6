"""Qwen-Image 2.1 LoRAs in ComfyUI's names: `diffusion_model.` + diffusers' module paths, each block's SwiGLU gate and
up projections fused into ComfyUI's one `img_mlp.gate_up` (gate rows first), which diffusers' single-file converter of
ComfyUI's checkpoint splits back; the fused LoRA adds exactly the pieces' weights, diffusers' Qwen-Image reader loads
every other layer with the same weights, and --from_webui gives the LoRA back (read as 2.1's, not Qwen-Image's)."""
from __future__ import annotations

import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.families.qwen_image_21 import original_layer
from hcpdiff.tools.lora_convert import webui_file_family
from hcpdiff.tools.tiny_qwen_image_21 import build_transformer

from lora_states import deltas, from_webui_deltas, linear_weights, peft_deltas, random_lora, to_webui, webui_delta

Q21 = family_named("qwen_image_21")


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer()


def test_comfyui_names_are_what_diffusers_reads_comfyuis_checkpoint_by(transformer):
    """Every Linear's weight under its ComfyUI name (gate and up stacked into gate_up) converts back, by diffusers'
    convert_qwen_image21_transformer_checkpoint_to_diffusers, to the diffusers module it came from."""
    weights = linear_weights(transformer)
    state = random_lora(transformer, lambda name: True, seed=1)  # a gate / up layer's width is read from its LoRA
    original: dict[str, torch.Tensor] = {}
    for name in weights:
        layer, _ = original_layer(name, state)
        original[f"model.diffusion_model.{layer.name}.weight"] = torch.cat([weights[piece] for piece in layer.pieces])
    assert "model.diffusion_model.transformer_blocks.0.img_mlp.gate_up.weight" in original
    converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == {f"{name}.weight" for name in weights}
    assert all(torch.equal(converted[f"{name}.weight"], weight) for name, weight in weights.items())


def test_round_trip_through_the_cli_and_diffusers_reads_the_other_layers(transformer, tmp_path, cli_in_process):
    native = random_lora(transformer, lambda name: "transformer_blocks.1." not in name, seed=2)
    written, metadata, stderr = to_webui(cli_in_process, tmp_path, native, "qwen_image_21")
    assert "QwenImage21Pipeline.load_lora_weights leaves out the fused MLP layers" in stderr
    assert all(key.startswith("diffusion_model.") for key in written)
    assert "diffusion_model.transformer_blocks.0.img_mlp.gate_up.lora_up.weight" in written
    assert not any("gate_layer" in key or "img_mlp.proj" in key for key in written)
    assert metadata["ss_base_model_version"] == "qwen_image_21" and webui_file_family(written, metadata) is Q21
    assert webui_file_family(written, {}) is Q21  # by its names alone: Qwen-Image (asked after it) has no gate_up
    pieces = deltas(native)
    stacked = torch.cat([pieces[f"transformer_blocks.0.img_mlp.{piece}"] for piece in ("gate_layer", "proj")])
    assert torch.allclose(webui_delta(written, "diffusion_model.transformer_blocks.0.img_mlp.gate_up"), stacked,
                          atol=1e-6)

    restored = from_webui_deltas(cli_in_process, tmp_path)
    assert restored.keys() == pieces.keys()
    assert all(torch.allclose(restored[name], delta, atol=1e-6) for name, delta in pieces.items())

    # diffusers' Qwen-Image reader: every layer but the fused gate_up ones (its 2.1 transformer has no such module)
    got = peft_deltas(QwenImage21Pipeline.lora_state_dict(dict(written)))
    assert got.keys() == {name for name in pieces if not name.endswith(("gate_layer", "img_mlp.proj"))} | {
        name.replace("gate_layer", "gate_up") for name in pieces if name.endswith("gate_layer")}
    assert all(torch.allclose(got[name], pieces[name], atol=1e-5) for name in got if "gate_up" not in name)


def test_qwen_image_files_stay_qwen_images_and_bad_layers_are_refused():
    qwen_image = {"diffusion_model.transformer_blocks.0.img_mod.1.lora_down.weight": torch.zeros(1, 2)}
    assert webui_file_family(qwen_image, {}) is family_named("qwen_image")
    assert webui_file_family(qwen_image, {"ss_base_model_version": "qwen_image"}) is family_named("qwen_image")
    with pytest.raises(ModelError, match="Qwen-Image 2.1 text_encoder LoRA has no ComfyUI layout"):
        Q21.native_to_webui({"transformer": {}, "text_encoder": {}})
    with pytest.raises(ModelError, match="webui LoRA layer 'diffusion_model.transformer_blocks.0.img_mod.1' names no"):
        Q21.webui_to_native({"diffusion_model.transformer_blocks.0.img_mod.1.lora_down.weight": torch.zeros(1, 2),
                             "diffusion_model.transformer_blocks.0.img_mlp.out.lora_down.weight": torch.zeros(1, 2)},
                            None)
