"""Native LoRA files: keys, shapes, alpha and metadata survive a round trip; foreign files get a helpful error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hcpdiff.errors import ModelError
from hcpdiff.lora import LoraGroupSpec, attach_lora, load_lora, load_lora_into, lora_metadata, lora_state_dict, save_lora

SPECS = [
    LoraGroupSpec(lr=1e-4, rank=4, alpha=2, layers=[r"re:.*\.to_k$"]),
    LoraGroupSpec(lr=2e-4, rank=0.5, layers=["conv_in", r"re:.*resnets\.0\.conv1$"]),
]


def randomize(groups) -> None:
    """Give every adapter weight random values, so a round trip has something to carry."""
    with torch.no_grad():
        for group in groups:
            for param in group.params:
                param.normal_(std=0.1)


@pytest.fixture
def trained_unet(tiny_unet):
    """The tiny U-Net with two groups attached and random adapter weights."""
    groups = attach_lora(tiny_unet, SPECS, "unet", "lora_unet")
    randomize(groups)
    return tiny_unet, groups


def test_state_dict_keys_shapes_and_alpha(trained_unet) -> None:
    unet, groups = trained_unet
    state = lora_state_dict(unet)
    layers = [name for group in groups for name in group.layers]
    assert set(state) == {f"{name}{suffix}" for name in layers for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha")}
    to_k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    assert state[f"{to_k}.lora_A.weight"].shape == (4, 64)
    assert state[f"{to_k}.lora_B.weight"].shape == (64, 4)
    assert state[f"{to_k}.alpha"].dim() == 0 and state[f"{to_k}.alpha"].dtype == torch.float32
    assert float(state[f"{to_k}.alpha"]) == 2.0
    assert state["conv_in.lora_A.weight"].shape == (16, 4, 3, 3)  # 0.5 * 32 output channels
    assert state["conv_in.lora_B.weight"].shape == (32, 16, 1, 1)
    assert float(state["conv_in.alpha"]) == 16.0


def test_round_trip_through_a_file(trained_unet, tiny_unet_factory, tmp_path: Path) -> None:
    unet, groups = trained_unet
    path = tmp_path / "ckpts" / "unet-100.safetensors"
    save_lora(path, lora_state_dict(unet), lora_metadata("unet", "tiny-sd", groups, step=100))
    assert [p.name for p in path.parent.iterdir()] == ["unet-100.safetensors"]  # no temp file left behind

    state, metadata = load_lora(path)
    assert {key: value.shape for key, value in state.items()} == {key: value.shape for key, value in lora_state_dict(unet).items()}
    assert metadata["format"] == "hcpdiff.lora" and metadata["format_version"] == "1"
    assert (metadata["part"], metadata["base_model"], metadata["step"]) == ("unet", "tiny-sd", "100")
    assert json.loads(metadata["groups"]) == [
        {"name": "lora_unet[0]", "rank": 4, "alpha": 2, "dropout": 0.0, "type": "lora", "dora": False, "lr": 1e-4, "patterns": [r"re:.*\.to_k$"]},
        {"name": "lora_unet[1]", "rank": 0.5, "alpha": None, "dropout": 0.0, "type": "lora", "dora": False, "lr": 2e-4, "patterns": ["conv_in", r"re:.*resnets\.0\.conv1$"]},
    ]

    fresh = tiny_unet_factory()
    attach_lora(fresh, SPECS, "unet", "lora_unet")
    load_lora_into(fresh, state)
    reloaded = lora_state_dict(fresh)
    assert all(torch.equal(reloaded[key], state[key]) for key in state)


def test_load_into_checks_shapes(trained_unet, tiny_unet_factory) -> None:
    unet, _ = trained_unet
    state = lora_state_dict(unet)
    other = tiny_unet_factory()
    attach_lora(other, [LoraGroupSpec(lr=1e-4, rank=8, layers=[r"re:.*\.to_k$"]), SPECS[1]], "unet", "lora_unet")
    with pytest.raises(ModelError, match=r"attn1\.to_k\.lora_A\.weight' has shape \(4, 64\).*\(8, 64\)"):
        load_lora_into(other, state)


def test_load_into_refuses_layers_without_adapter(trained_unet, tiny_unet_factory) -> None:
    unet, _ = trained_unet
    other = tiny_unet_factory()
    attach_lora(other, SPECS[:1], "unet", "lora_unet")
    with pytest.raises(ModelError, match="have no attached adapter"):
        load_lora_into(other, lora_state_dict(unet))


def test_failed_save_keeps_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "unet-1.safetensors"
    layer = {"conv_in.lora_A.weight": torch.zeros(2, 4), "conv_in.lora_B.weight": torch.zeros(4, 2)}
    save_lora(path, {**layer, "conv_in.alpha": torch.tensor(1.0)}, {})

    def no_rename(src, dst) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("hcpdiff.lora.state_io.os.replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        save_lora(path, {**layer, "conv_in.alpha": torch.tensor(2.0)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["unet-1.safetensors"]
    assert float(load_lora(path)[0]["conv_in.alpha"]) == 1.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"LoRA file '.*nope\.safetensors' does not exist"):
        load_lora(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not safetensors")
    with pytest.raises(ModelError, match=r"'.*junk\.safetensors' is not a safetensors file"):
        load_lora(path)


def test_webui_file_gets_a_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "webui.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4),
        },
        str(path),
    )
    with pytest.raises(ModelError) as caught:
        load_lora(path)
    assert str(caught.value) == (
        f"LoRA file '{path}' is not an hcpdiff LoRA (no format=hcpdiff.lora metadata). It looks like a webui/kohya "
        "LoRA; convert it with hcpdiff.tools.lora_convert --from_webui."
    )
