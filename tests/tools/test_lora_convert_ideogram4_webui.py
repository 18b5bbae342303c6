"""Ideogram 4 LoRAs in ComfyUI's names: `diffusion_model.` + the module paths of ComfyUI's Ideogram 4 model (q, k, v
fused into `attention.qkv`, `attention.o`; the rest as diffusers names them); the fused LoRA adds exactly the pieces'
weights, diffusers' own reader of that layout loads the blocks' layers with the same weights, and --from_webui gives
the LoRA back."""
from __future__ import annotations

import pytest
import torch
from diffusers import Ideogram4Pipeline

from hcpdiff.errors import ModelError
from hcpdiff.families import family_named
from hcpdiff.families.ideogram4 import original_layer
from hcpdiff.tools.lora_convert import webui_file_family
from hcpdiff.tools.tiny_ideogram4 import build_ideogram4_transformer

from lora_states import deltas, from_webui_deltas, linear_weights, peft_deltas, random_lora, to_webui, webui_delta

IDEOGRAM4 = family_named("ideogram4")
# the Linear layers of ComfyUI's Ideogram4Transformer2DModel (comfy/ldm/ideogram4/model.py at ComfyUI commit
# ca686606aed606b8ef6ca90c0580f8f0e2dc3a66: Ideogram4Transformer, -TransformerBlock, -Attention, -EmbedScalar,
# -FinalLayer, and lumina's FeedForward), by module path; per block and at the top level
COMFY_BLOCK_LINEARS = ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                       "adaln_modulation")
COMFY_TOP_LINEARS = ("input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
                     "final_layer.linear", "final_layer.adaln_modulation")


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_ideogram4_transformer()


def test_every_layer_has_its_comfyui_name_and_qkv_stacks_q_k_v(transformer):
    layers = {name: original_layer(name) for name in linear_weights(transformer)}
    blocks = len(transformer.layers)
    assert {layer.name for layer, _ in layers.values()} == {*COMFY_TOP_LINEARS, *(
        f"layers.{i}.{name}" for i in range(blocks) for name in COMFY_BLOCK_LINEARS)}
    qkv, _ = layers["layers.0.attention.to_q"]
    # ComfyUI views qkv's output as (3, heads, head_dim): rows q, then k, then v
    assert qkv.pieces == ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v")
    assert layers["layers.1.attention.to_k"][1] == 1 and layers["layers.0.attention.to_out.0"][0].name == (
        "layers.0.attention.o")


def test_round_trip_through_the_cli_and_diffusers_reads_the_same_weights(transformer, tmp_path, cli_in_process):
    native = random_lora(transformer, lambda name: "layers.1." not in name, seed=2)
    written, metadata, stderr = to_webui(cli_in_process, tmp_path, native, "ideogram4")
    assert "Ideogram4Pipeline.load_lora_weights refuses" in stderr and "input_proj" in stderr  # the note
    layers = {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in written}
    assert {"diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.o",
            "diffusion_model.layers.0.feed_forward.w3", "diffusion_model.t_embedding.mlp_in"} <= layers
    assert all(layer.startswith("diffusion_model.") for layer in layers)
    assert metadata["ss_base_model_version"] == "ideogram4" and webui_file_family(written, metadata) is IDEOGRAM4
    assert webui_file_family(written, {}) is IDEOGRAM4  # by its names alone (Z-Image's are alike)
    pieces = deltas(native)
    stacked = torch.cat([pieces[f"layers.0.attention.{p}"] for p in ("to_q", "to_k", "to_v")])
    assert torch.allclose(webui_delta(written, "diffusion_model.layers.0.attention.qkv"), stacked, atol=1e-6)

    restored = from_webui_deltas(cli_in_process, tmp_path)
    assert restored.keys() == pieces.keys()
    assert all(torch.allclose(restored[name], delta, atol=1e-6) for name, delta in pieces.items())

    # diffusers' own reader of this layout (ai-toolkit's) takes the blocks' layers: the same weights for each
    blocks = {key: tensor for key, tensor in written.items() if key.startswith("diffusion_model.layers.")}
    got = peft_deltas(Ideogram4Pipeline.lora_state_dict(blocks))
    assert got.keys() == {name for name in pieces if name.startswith("layers.")}
    assert all(torch.allclose(got[name], pieces[name], atol=1e-5) for name in got)


def test_text_encoder_loras_and_unknown_layers_are_refused():
    with pytest.raises(ModelError, match="Ideogram 4 text_encoder LoRA has no ComfyUI layout"):
        IDEOGRAM4.native_to_webui({"transformer": {}, "text_encoder": {}})
    with pytest.raises(ModelError, match="webui LoRA layer 'diffusion_model.layers.0.attention.out' names no Linear"):
        IDEOGRAM4.webui_to_native({"diffusion_model.layers.0.attention.out.lora_down.weight": torch.zeros(1, 2)}, None)
