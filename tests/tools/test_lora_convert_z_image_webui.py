"""Z-Image LoRAs in ComfyUI's names: `diffusion_model.` + the original layout's module paths (q, k, v fused into
`attention.qkv`, `attention.out`, `x_embedder`, `final_layer`), which diffusers' own single-file converter maps back to
the diffusers modules; the fused LoRA adds exactly the pieces' weights, and --from_webui gives them back."""
from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.families.z_image import original_layer

from lora_states import deltas, from_webui_deltas, linear_weights, random_lora, to_webui

Z_IMAGE = family_named("z_image")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory) -> ZImageTransformer2DModel:
    model = Z_IMAGE.make_tiny(tmp_path_factory.mktemp("z") / "model", seed=0)
    return ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")


def test_original_names_are_what_diffusers_single_file_converter_reads(transformer):
    """Every Linear's weight written under its original-layout name (q, k, v stacked into qkv) converts back, by
    diffusers' convert_z_image_transformer_checkpoint_to_diffusers, to the diffusers module it came from."""
    weights = linear_weights(transformer)
    original: dict[str, torch.Tensor] = {}
    for name in weights:
        layer, _ = original_layer(name)
        original[f"{layer.name}.weight"] = torch.cat([weights[piece] for piece in layer.pieces])
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == {f"{name}.weight" for name in weights}
    assert all(torch.equal(converted[f"{name}.weight"], weight) for name, weight in weights.items())
    assert any(name.endswith(".attention.qkv.weight") for name in original)


def test_to_webui_fuses_qkv_exactly(transformer):
    """ComfyUI's names for every trained layer; a fused qkv LoRA adds exactly what its q, k and v LoRAs add, stacked
    (the file's own tensors: --from_webui is checked through the CLI below)."""
    native = random_lora(transformer, lambda name: ".attention." in name or "feed_forward" in name
                         or "x_embedder" in name, seed=1)
    webui = Z_IMAGE.native_to_webui({"transformer": native})["transformer"]
    assert all(name.startswith("diffusion_model.") for name in webui)
    assert "diffusion_model.layers.0.attention.qkv" in webui and "diffusion_model.layers.0.attention.out" in webui
    assert "diffusion_model.x_embedder" in webui and not any("to_q" in name for name in webui)
    pieces = deltas(native)
    for name, parts in webui.items():
        fused = deltas({f"{name}{suffix}": tensor for suffix, tensor in parts.items()})[name]
        stacked = torch.cat([pieces[piece] for piece in original_layer_pieces(name)])
        assert torch.allclose(fused, stacked, atol=1e-6), name


def original_layer_pieces(webui_name: str) -> tuple[str, ...]:
    from hcpdiff.families.z_image import layer_of_original_name

    return layer_of_original_name(webui_name.removeprefix("diffusion_model.")).pieces


def test_lora_convert_round_trip_through_the_cli(transformer, tmp_path, cli_in_process):
    native = random_lora(transformer, lambda name: "layers.0." in name, seed=2)
    written, _, _ = to_webui(cli_in_process, tmp_path, native, "z_image")
    assert any(key.startswith("diffusion_model.layers.0.attention.qkv.") for key in written)
    restored = from_webui_deltas(cli_in_process, tmp_path)
    assert restored.keys() == deltas(native).keys()
    assert all(torch.allclose(restored[name], delta, atol=1e-6) for name, delta in deltas(native).items())


def test_a_text_encoder_lora_has_no_comfyui_layout():
    with pytest.raises(ModelError, match="Z-Image text_encoder LoRA has no ComfyUI layout"):
        Z_IMAGE.native_to_webui({"transformer": {}, "text_encoder": {}})
