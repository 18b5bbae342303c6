"""attach_lora: one peft adapter per group, each active on its own layers, only LoRA weights trainable."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.lora import LoraGroupSpec, attach_lora

# the reference guide's "advanced" block
GUIDE_UNET = [LoraGroupSpec(lr=1e-4, rank=16, alpha=2, layers=[r"re:.*\.to_k$", r"re:.*\.to_v$", r"re:.*\.ff$"])]
GUIDE_TEXT = [LoraGroupSpec(lr=2e-5, rank=2, dropout=0.1, layers=["re:.*self_attn$", "re:.*mlp$"])]


def unet_output(unet) -> torch.Tensor:
    """The U-Net's prediction for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), context).sample


def test_guide_block_attaches_to_the_unet(tiny_unet) -> None:
    base = unet_output(tiny_unet)
    [group] = attach_lora(tiny_unet, GUIDE_UNET, "unet", "lora_unet")
    assert group.name == "unet_g0" and group.lr == 1e-4
    assert len(group.layers) == 12 + 12 + 12  # to_k, to_v, ff.net.0.proj + ff.net.2 in 6 transformer blocks
    layer = tiny_unet.get_submodule(group.layers[0])
    assert isinstance(layer, LoraLayer)
    assert layer.r == {"unet_g0": 16} and layer.scaling == {"unet_g0": 2 / 16}
    assert torch.equal(unet_output(tiny_unet), base)  # B starts at zero: the LoRA starts as the identity


def test_guide_block_attaches_to_the_text_encoder(tiny_text_encoder) -> None:
    [group] = attach_lora(tiny_text_encoder, GUIDE_TEXT, "text_encoder", "lora_text_encoder")
    assert group.name == "text_encoder_g0" and group.lr == 2e-5
    assert len(group.layers) == 12 and len(group.params) == 24
    layer = tiny_text_encoder.get_submodule(group.layers[0])
    assert layer.r == {"text_encoder_g0": 2} and layer.scaling == {"text_encoder_g0": 1.0}
    assert layer.lora_dropout["text_encoder_g0"].p == 0.1


def test_only_lora_weights_require_grad(tiny_unet) -> None:
    groups = attach_lora(tiny_unet, GUIDE_UNET, "unet", "lora_unet")
    trainable = {name for name, param in tiny_unet.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {id(param) for group in groups for param in group.params} == {
        id(param) for param in tiny_unet.parameters() if param.requires_grad
    }


def test_every_layer_computes_with_its_own_groups_adapter(tiny_unet) -> None:
    specs = [
        LoraGroupSpec(lr=1e-4, rank=4, layers=[r"re:.*\.to_k$"]),
        LoraGroupSpec(lr=2e-4, rank=2, layers=[r"re:.*\.to_v$"]),
        LoraGroupSpec(lr=3e-4, rank=8, layers=["conv_in", r"re:.*\.ff$"]),
    ]
    base = unet_output(tiny_unet)
    groups = attach_lora(tiny_unet, specs, "unet", "lora_unet")
    assert [group.name for group in groups] == ["unet_g0", "unet_g1", "unet_g2"]
    assert [group.lr for group in groups] == [1e-4, 2e-4, 3e-4]
    for group in groups:
        for name in group.layers:
            layer = tiny_unet.get_submodule(name)
            assert list(layer.lora_A) == [group.name] and group.name in layer.active_adapters
    for group in groups:
        for lora_b in group.params[1::2]:
            with torch.no_grad():
                lora_b.fill_(0.01)
            assert not torch.equal(unet_output(tiny_unet), base), f"{group.name} has an inactive layer"
            with torch.no_grad():
                lora_b.zero_()


def test_float_rank_is_a_ratio_of_each_layers_width(tiny_unet) -> None:
    [group] = attach_lora(tiny_unet, [LoraGroupSpec(lr=1e-4, rank=0.25, layers=[r"re:.*\.to_k$", r"re:.*\.ff$"])], "unet", "lora_unet")
    ranks = {name: tiny_unet.get_submodule(name).r["unet_g0"] for name in group.layers}
    alphas = {name: tiny_unet.get_submodule(name).lora_alpha["unet_g0"] for name in group.layers}
    to_k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    ff_out = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    ff_in = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert ranks[to_k] == 16 and ranks[ff_out] == 16  # 0.25 * 64 output features
    assert ranks[ff_in] == 64  # 0.25 * 512 capped by the 64 input features
    assert alphas == {name: float(rank) for name, rank in ranks.items()}  # alpha None -> scale 1
    assert tiny_unet.get_submodule(to_k).lora_A["unet_g0"].weight.shape == (16, 64)


def test_layer_claimed_by_two_groups(tiny_unet) -> None:
    specs = [LoraGroupSpec(lr=1e-4, layers=[r"re:.*\.to_k$"]), LoraGroupSpec(lr=1e-4, layers=[r"re:.*attn1$"])]
    with pytest.raises(ConfigError) as caught:
        attach_lora(tiny_unet, specs, "unet", "lora_unet")
    message = str(caught.value)
    assert "attn1.to_k'" in message and "lora_unet[0]" in message and "lora_unet[1]" in message


def test_rank_wider_than_the_layer_names_it(tiny_text_encoder) -> None:
    with pytest.raises(ConfigError, match=r"lora_text_encoder\[0\]\.rank: rank 64 exceeds .*encoder\.layers\.0\.self_attn\.k_proj"):
        attach_lora(tiny_text_encoder, [LoraGroupSpec(lr=1e-4, rank=64, layers=["re:.*self_attn$"])], "text_encoder", "lora_text_encoder")


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", 0), ("rank", 1.5), ("rank", "8"), ("rank", True), ("alpha", 0), ("dropout", 1.0), ("layers", "re:.*")],
)
def test_bad_group_values_name_the_field(tiny_text_encoder, field: str, value) -> None:
    spec = LoraGroupSpec(lr=1e-4, layers=["re:.*mlp$"])
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match=rf"lora_text_encoder\[0\]\.{field}:"):
        attach_lora(tiny_text_encoder, [spec], "text_encoder", "lora_text_encoder")


def test_attaching_twice_is_refused(tiny_text_encoder) -> None:
    attach_lora(tiny_text_encoder, GUIDE_TEXT, "text_encoder", "lora_text_encoder")
    with pytest.raises(ModelError, match="already has LoRA adapters"):
        attach_lora(tiny_text_encoder, GUIDE_TEXT, "text_encoder", "lora_text_encoder")


class Nested(torch.nn.Module):
    """A root layer whose name is also the tail of a nested one: `proj` and `block.proj`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.block = torch.nn.Module()
        self.block.proj = torch.nn.Linear(8, 16)
        self.block.out = torch.nn.Linear(16, 4)


def test_a_layer_name_never_matches_a_longer_one() -> None:
    # peft matches a target list by suffix and rank_pattern keys as `(.*\.)?KEY$`; exact names must stay exact
    model = Nested()
    specs = [LoraGroupSpec(lr=1e-4, rank=2, layers=["proj"]), LoraGroupSpec(lr=1e-4, rank=0.5, layers=["block"])]
    attach_lora(model, specs, "toy", "lora_toy")
    assert model.proj.r == {"toy_g0": 2}
    assert model.block.proj.r == {"toy_g1": 8} and model.block.out.r == {"toy_g1": 2}
