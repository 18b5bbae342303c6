"""FLUX.2 LoRAs as kohya / ComfyUI files: `lora_unet_` + BFL's original FLUX.2 layout (q / k / v fused into `qkv`,
`linear1` / `linear2`, the global `*_modulation.lin`, the final adaLN with its halves swapped), which diffusers'
single-file converter maps back to the diffusers modules and ComfyUI's generic key map reads; the fused LoRA adds
exactly the pieces' weights, diffusers' kohya FLUX.2 reader loads the blocks and input layers with the same weights,
and --from_webui gives the LoRA back, as klein's or dev's by the file's metadata."""
from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.families.flux2 import bfl_layer
from hcpdiff.lora.fused_layout import swap_halves
from hcpdiff.tools.lora_convert import webui_file_family
from hcpdiff.tools.tiny_flux2 import build_flux2_transformer

from lora_states import deltas, from_webui_deltas, linear_weights, peft_deltas, random_lora, to_webui, webui_delta

KLEIN, DEV = family_named("flux2_klein"), family_named("flux2_dev")


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_flux2_transformer()


def test_bfl_names_are_what_diffusers_single_file_converter_reads(transformer):
    """Every Linear's weight under its BFL name (q, k, v stacked; the final adaLN's halves swapped) converts back, by
    diffusers' convert_flux2_transformer_checkpoint_to_diffusers, to the diffusers module it came from."""
    weights = linear_weights(transformer)
    original: dict[str, torch.Tensor] = {}
    for name in weights:
        layer, _ = bfl_layer(name)
        stacked = torch.cat([weights[piece] for piece in layer.pieces])
        original[f"{layer.name}.weight"] = swap_halves(stacked) if layer.swap_halves else stacked
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "double_stream_modulation_img.lin.weight", "final_layer.adaLN_modulation.1.weight"} <= original.keys()
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == {f"{name}.weight" for name in weights}
    assert all(torch.equal(converted[f"{name}.weight"], weight) for name, weight in weights.items())


def test_round_trip_through_the_cli_and_diffusers_reads_the_same_weights(transformer, tmp_path, cli_in_process):
    native = random_lora(transformer, lambda name: "transformer_blocks.1." not in name, seed=2)
    written, metadata, stderr = to_webui(cli_in_process, tmp_path, native, "flux2_klein")
    assert "leaves out double_stream_modulation_img.lin" in stderr  # the note on diffusers' reader
    layers = {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in written}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_0",
            "lora_unet_single_blocks_3_linear1", "lora_unet_single_stream_modulation_lin",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_time_in_in_layer"} <= layers
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == ("flux2", "flux-2-klein/lora")
    assert webui_file_family(written, metadata) is KLEIN and webui_file_family(written, {}) is KLEIN
    dev_metadata = {**metadata, "modelspec.architecture": "flux-2-dev/lora"}
    assert webui_file_family(written, dev_metadata) is DEV
    pieces = deltas(native)
    stacked = torch.cat([pieces[f"transformer_blocks.0.attn.{p}"] for p in ("to_q", "to_k", "to_v")])
    assert torch.allclose(webui_delta(written, "lora_unet_double_blocks_0_img_attn_qkv"), stacked, atol=1e-6)

    restored = from_webui_deltas(cli_in_process, tmp_path)
    assert restored.keys() == pieces.keys()
    assert all(torch.allclose(restored[name], delta, atol=1e-6) for name, delta in pieces.items())
    # the same in ComfyUI's dotted names (`diffusion_model.` + the BFL path), which --from_webui reads too
    dotted = {key.replace("lora_unet_single_blocks_3_linear1", "diffusion_model.single_blocks.3.linear1"): tensor
              for key, tensor in written.items() if "single_blocks_3_linear1" in key}
    assert deltas(DEV.webui_to_native(dotted, None)["transformer"]).keys() == {
        "single_transformer_blocks.3.attn.to_qkv_mlp_proj"}

    # diffusers' kohya FLUX.2 reader: the blocks and input layers, with the same weights; the rest it leaves out
    got = peft_deltas(Flux2KleinPipeline.lora_state_dict(dict(written)))
    left_out = ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                "single_stream_modulation.linear", "norm_out.linear")
    assert got.keys() == pieces.keys() - set(left_out)
    assert all(torch.allclose(got[name], pieces[name], atol=1e-5) for name in got)


def test_flux1_files_stay_flux1s_and_bad_layers_are_refused():
    flux1 = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 2)}
    assert webui_file_family(flux1, {"ss_base_model_version": "flux1"}) is family_named("flux")
    assert webui_file_family(flux1, {}) is family_named("flux")  # block names alone: FLUX.1's (the same names)
    with pytest.raises(ModelError, match=r"FLUX.2 \[klein\] text_encoder LoRA has no ComfyUI layout"):
        KLEIN.native_to_webui({"transformer": {}, "text_encoder": {}})
    with pytest.raises(ModelError, match="webui LoRA layer 'lora_unet_double_blocks_0_img_mod_lin' is no layer"):
        KLEIN.webui_to_native({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(1, 2)}, None)
