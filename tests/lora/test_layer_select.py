"""select_layers: `re:` full-match patterns, exact names, containers expanding to their Linear / Conv2d layers."""
from __future__ import annotations

import pytest

from hcpdiff.errors import ConfigError
from hcpdiff.lora import select_layers

TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


def test_regex_must_match_the_whole_name(tiny_unet) -> None:
    with pytest.raises(ConfigError):
        select_layers(tiny_unet, ["re:to_k"], "lora_unet[0].layers")  # would match with re.search
    with pytest.raises(ConfigError):
        select_layers(tiny_unet, ["re:.*to_"], "lora_unet[0].layers")
    to_k = select_layers(tiny_unet, ["re:.*to_k"], "lora_unet[0].layers")
    assert to_k == select_layers(tiny_unet, [r"re:.*\.to_k$"], "lora_unet[0].layers")
    assert TO_K in to_k and all(name.endswith(".to_k") for name in to_k)


def test_container_expands_to_its_layers(tiny_unet) -> None:
    layers = select_layers(tiny_unet, [r"re:.*\.ff$"], "lora_unet[0].layers")
    block = "down_blocks.1.attentions.0.transformer_blocks.0.ff"
    assert f"{block}.net.0.proj" in layers and f"{block}.net.2" in layers
    assert {name.rsplit(".ff.", 1)[1] for name in layers} == {"net.0.proj", "net.2"}


def test_attention_container_gives_its_projections(tiny_unet) -> None:
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert select_layers(tiny_unet, [attn], "w") == [f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v", f"{attn}.to_out.0"]


def test_exact_name_and_conv_leaf(tiny_unet) -> None:
    assert select_layers(tiny_unet, [TO_K], "w") == [TO_K]
    assert select_layers(tiny_unet, ["conv_in"], "w") == ["conv_in"]


def test_empty_pattern_is_the_whole_model(tiny_unet) -> None:
    import torch.nn as nn

    everything = select_layers(tiny_unet, [""], "w")
    expected = [name for name, module in tiny_unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    assert everything == expected


def test_patterns_union_in_model_order_without_duplicates(tiny_unet) -> None:
    layers = select_layers(tiny_unet, [r"re:.*\.to_v$", r"re:.*\.to_k$", TO_K], "w")
    names = [name for name, _ in tiny_unet.named_modules()]
    assert len(layers) == len(set(layers)) == 24
    assert layers == sorted(layers, key=names.index)


def test_text_encoder_guide_patterns(tiny_text_encoder) -> None:
    layers = select_layers(tiny_text_encoder, ["re:.*self_attn$", "re:.*mlp$"], "lora_text_encoder[0].layers")
    assert len(layers) == 2 * (4 + 2)
    assert {name.split(".", 3)[3] for name in layers} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
    }


def test_no_match_names_the_key_pattern_and_close_names(tiny_unet) -> None:
    with pytest.raises(ConfigError) as caught:
        select_layers(tiny_unet, [r"re:.*\.to_kk$"], "lora_unet[0].layers")
    message = str(caught.value)
    assert message.startswith(r"lora_unet[0].layers: pattern 're:.*\.to_kk$' matches no module")
    assert TO_K in message
    assert message.count(", ") == 4  # five suggestions


def test_misspelt_exact_name_suggests_real_ones(tiny_unet) -> None:
    with pytest.raises(ConfigError, match=r"down_blocks\.1\.attentions\.0\.proj_in"):
        select_layers(tiny_unet, ["down_blocks.1.attentions.0.proj"], "w")


def test_match_without_any_linear_or_conv_is_an_error(tiny_unet) -> None:
    with pytest.raises(ConfigError, match="neither is nor contains a Linear or Conv2d"):
        select_layers(tiny_unet, ["re:.*norm1$"], "w")


def test_invalid_regex_is_a_config_error(tiny_unet) -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        select_layers(tiny_unet, ["re:(["], "w")


@pytest.mark.parametrize("pattern", [
    "", "down_blocks.1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1", TO_K, "conv_in",
    r"re:.*\.ff$", r"re:.*\.attn2", r"re:.*\.to_[qv]$", r"re:down_blocks\.\d+\.resnets\.\d+",
])
def test_weight_filters_select_what_training_selects(tiny_unet, pattern) -> None:
    """The visualizer filters a LoRA file's layers with `pattern_selects` (no model at hand): it keeps exactly the
    layers that `select_layers` gives the same pattern in training, containers and `re:` containers included."""
    from hcpdiff.lora.layer_select import ADAPTABLE, pattern_selects

    leaves = [name for name, module in tiny_unet.named_modules() if isinstance(module, ADAPTABLE)]
    assert [name for name in leaves if pattern_selects(pattern, name)] == select_layers(tiny_unet, [pattern], "w")


def test_weight_filter_with_a_broken_regex_names_the_key() -> None:
    from hcpdiff.lora.layer_select import pattern_selects

    with pytest.raises(ConfigError, match=r"merge\.group_unet.*not a valid regular expression"):
        pattern_selects("re:to_(k", "a.to_k", "merge.group_unet.layers")
