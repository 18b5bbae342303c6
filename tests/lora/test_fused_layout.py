"""Fusing separate q / k / v (and MLP) LoRAs into one LoRA of an original-layout stacked layer, and splitting it back:
exact for full and partial sets, any ranks and scales; FLUX's BFL table covers every layer of the full-size model."""
from __future__ import annotations

import pytest
import torch

from hcpdiff.errors import ModelError
from hcpdiff.families.flux import bfl_layer, bfl_layer_of_webui_name
from hcpdiff.lora.fused_layout import FusedLayer, fuse_lora, fused_to_native, native_to_fused, split_lora
from hcpdiff.lora.state_io import layer_states

QKV = FusedLayer("blocks.0.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1))
LINEAR1 = FusedLayer("single.0.linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4))
WIDTH = 8


def lora(out_features: int, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """A random native LoRA of one Linear(WIDTH -> out_features)."""
    generator = torch.Generator().manual_seed(seed)
    return {".lora_A.weight": torch.randn(rank, WIDTH, generator=generator),
            ".lora_B.weight": torch.randn(out_features, rank, generator=generator), ".alpha": torch.tensor(alpha)}


def delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight change a LoRA merges: alpha / rank * B @ A."""
    return float(parts[".alpha"]) / parts[".lora_A.weight"].shape[0] * parts[".lora_B.weight"] @ parts[".lora_A.weight"]


def stacked_delta(layer: FusedLayer, pieces: list) -> torch.Tensor:
    """The stacked layer's weight change the pieces make (zero rows for a piece without LoRA)."""
    return torch.cat([delta(p) if p is not None else torch.zeros(ratio * WIDTH, WIDTH)
                      for p, ratio in zip(pieces, layer.width_ratios)])


def test_full_qkv_with_one_scale_fuses_block_diagonal_and_splits_back_bit_exact() -> None:
    pieces = [lora(WIDTH, 4, 2.0, seed) for seed in range(3)]
    fused = fuse_lora(QKV, pieces)
    assert fused[".lora_A.weight"].shape == (12, WIDTH) and fused[".lora_B.weight"].shape == (3 * WIDTH, 12)
    assert float(fused[".alpha"]) == 6.0  # alpha / rank stays 0.5 at rank 12
    assert torch.equal(fused[".lora_B.weight"][WIDTH:2 * WIDTH, :4], torch.zeros(WIDTH, 4))  # off-diagonal blocks
    assert torch.allclose(delta(fused), stacked_delta(QKV, pieces), atol=1e-6)
    for back, piece in zip(split_lora(QKV, fused), pieces):
        assert all(torch.equal(back[key], piece[key]) for key in piece)


def test_partial_qkv_with_different_ranks_and_scales_fuses_exactly() -> None:
    pieces = [lora(WIDTH, 4, 2.0, 0), lora(WIDTH, 2, 8.0, 1), None]  # to_v has no LoRA
    fused = fuse_lora(QKV, pieces)
    assert fused[".lora_A.weight"].shape[0] == 6 and float(fused[".alpha"]) == 6.0  # scales folded into B: scale 1
    assert torch.equal(fused[".lora_B.weight"][2 * WIDTH:], torch.zeros(WIDTH, 6))
    assert torch.allclose(delta(fused), stacked_delta(QKV, pieces), atol=1e-5)
    back = split_lora(QKV, fused)
    assert back[2] is None and [p[".lora_A.weight"].shape[0] for p in back[:2]] == [4, 2]
    for got, want in zip(back[:2], pieces[:2]):
        assert torch.allclose(delta(got), delta(want), atol=1e-5)


@pytest.mark.parametrize("present", [(0, 1, 2, 3), (3,), (0, 2)])
def test_single_block_linear1_fuses_any_subset_exactly(present: tuple[int, ...]) -> None:
    widths = [WIDTH, WIDTH, WIDTH, 4 * WIDTH]
    pieces = [lora(widths[i], 2 + i, 1.0 + i, i) if i in present else None for i in range(4)]
    fused = fuse_lora(LINEAR1, pieces)
    assert torch.allclose(delta(fused), stacked_delta(LINEAR1, pieces), atol=1e-5)
    back = split_lora(LINEAR1, fused)
    assert [i for i, p in enumerate(back) if p is not None] == list(present)
    assert torch.allclose(stacked_delta(LINEAR1, back), stacked_delta(LINEAR1, pieces), atol=1e-5)


def test_dense_trained_stacked_lora_splits_by_rows_with_shared_down() -> None:
    """A LoRA trained on the stacked layer (kohya on BFL's FLUX) is not block-diagonal: each piece keeps the whole
    down and its rows of up, which is exact."""
    trained = lora(7 * WIDTH, 4, 3.0, 5)
    back = split_lora(LINEAR1, trained)
    assert all(p[".lora_A.weight"].shape[0] == 4 for p in back)
    assert torch.allclose(stacked_delta(LINEAR1, back), delta(trained), atol=1e-5)


def test_swapped_halves_round_trip() -> None:
    layer = FusedLayer("final_layer.adaLN_modulation.1", ("norm_out.linear",), (2,), swap_halves=True)
    piece = lora(2 * WIDTH, 3, 1.5, 0)
    fused = fuse_lora(layer, [piece])
    assert torch.allclose(delta(fused), torch.cat([delta(piece)[WIDTH:], delta(piece)[:WIDTH]]), atol=1e-6)
    (back,) = split_lora(layer, fused)
    assert all(torch.equal(back[key], piece[key]) for key in piece)


def native(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {layer + suffix: tensor for layer, parts in layers.items() for suffix, tensor in parts.items()}


def test_flux_state_fuses_by_the_bfl_table_and_back() -> None:
    state = native({"transformer_blocks.0.attn.to_q": lora(WIDTH, 2, 2.0, 0),
                    "transformer_blocks.0.attn.add_k_proj": lora(WIDTH, 2, 2.0, 1),
                    "transformer_blocks.0.attn.to_out.0": lora(WIDTH, 2, 2.0, 2),
                    "single_transformer_blocks.1.proj_mlp": lora(4 * WIDTH, 2, 2.0, 3),
                    "norm_out.linear": lora(2 * WIDTH, 2, 2.0, 4)})
    fused = native_to_fused(state, bfl_layer, "transformer")
    assert set(fused) == {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
                          "double_blocks.0.img_attn.proj", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"}
    layers = [bfl_layer_of_webui_name(name.replace(".", "_")) for name in fused]
    back = fused_to_native(fused, layers, "transformer")
    assert set(back) == set(state)
    for layer, parts in layer_states(back).items():
        assert torch.allclose(delta(parts), delta(layer_states(state)[layer]), atol=1e-6)


def test_unexpressible_layers_are_one_error_naming_the_first() -> None:
    loha = {".hada_w1_a": torch.ones(WIDTH, 2), ".hada_w1_b": torch.ones(2, WIDTH), ".hada_w2_a": torch.ones(WIDTH, 2),
            ".hada_w2_b": torch.ones(2, WIDTH), ".alpha": torch.tensor(2.0)}
    state = native({"transformer_blocks.0.attn.to_k": loha, "transformer_blocks.0.attn.to_v": lora(WIDTH, 2, 2.0, 0),
                    "transformer_blocks.0.attn.to_out.0": loha})  # a LoHa that only renames is fine
    with pytest.raises(ModelError, match=r"'transformer_blocks\.0\.attn\.to_k' is a LoHa.*fuses with "
                                         r"transformer_blocks\.0\.attn\.to_q, transformer_blocks\.0\.attn\.to_v "
                                         r"into 'double_blocks\.0\.img_attn\.qkv'") as err:
        native_to_fused({**state, **native({"pos_embed.proj": lora(WIDTH, 2, 2.0, 1)})}, bfl_layer, "transformer")
    assert "(2 layers cannot be written)" in str(err.value) and "\n" not in str(err.value)


def test_flux_table_covers_every_layer_of_full_size_flux_dev() -> None:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():  # FLUX.1-dev's transformer/config.json
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    found = {name: bfl_layer(name) for name in linears}
    assert all(found.values()), [name for name, hit in found.items() if hit is None]
    bfl = {layer.name: layer for layer, _ in found.values()}
    assert len(bfl) == 19 * 10 + 38 * 3 + 10  # kohya's lora_flux names: 10 per double block, 3 per single, 10 others
    for layer in bfl.values():  # the widths the table gives are the model's
        widths = [linears[piece].out_features for piece in layer.pieces]
        if not layer.is_rename:
            assert widths == [ratio * linears[layer.pieces[0]].in_features for ratio in layer.width_ratios]
        assert bfl_layer_of_webui_name(layer.name.replace(".", "_")) == layer
