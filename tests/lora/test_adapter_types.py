"""LoHa, LoKr, DoRA and LoCon through peft: native keys, file round trip, exact merge, LyCORIS / webui export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcpdiff.errors import ConfigError
from hcpdiff.lora import LoraGroupSpec, attach_lora, load_lora, load_lora_into, lora_metadata, lora_state_dict, merge_lora, save_lora
from hcpdiff.lora.webui_format import native_to_webui

TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "down_blocks.0.resnets.0.conv1"  # LoCon: an adapter on a ResNet 3x3 convolution
PATTERNS = [r"re:.*attn1\.to_k$", r"re:.*resnets\.\d+\.conv[12]$"]
CASES = {
    "loha": {"type": "loha"},
    "lokr": {"type": "lokr"},
    "dora": {"dora": True},
    "locon": {},
}
SUFFIXES = {
    "loha": {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"},
    "dora": {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector.weight", ".alpha"},
    "locon": {".lora_A.weight", ".lora_B.weight", ".alpha"},
}


def trained(unet, case: str):
    """The U-Net with one group of the case's type, every adapter weight set to random values (as if trained)."""
    spec = LoraGroupSpec(lr=1e-4, layers=PATTERNS, rank=4, alpha=2.0, **CASES[case])
    groups = attach_lora(unet, [spec], "unet", "lora_unet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in groups[0].params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    return groups


def layer_inputs(layer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 64, generator=generator) if isinstance(layer, torch.nn.Linear) else torch.randn(
        1, 32, 8, 8, generator=generator)


def outputs(unet) -> dict[str, torch.Tensor]:
    """Each test layer's output on a fixed input (the adapter included when attached)."""
    with torch.no_grad():
        result = {}
        for name in (TO_K, CONV):
            layer = unet.get_submodule(name)
            base = getattr(layer, "base_layer", layer)
            result[name] = layer(layer_inputs(base))
        return result


@pytest.mark.parametrize("case", list(CASES))
def test_native_keys_round_trip_and_exact_merge(case: str, tiny_unet_factory, tmp_path: Path) -> None:
    unet = tiny_unet_factory()
    groups = trained(unet, case)
    state = lora_state_dict(unet)
    suffixes = {key[len(TO_K):] for key in state if key.startswith(TO_K + ".")}
    if case == "lokr":
        assert {".alpha", ".rank"} <= suffixes and suffixes & {".lokr_w1", ".lokr_w1_a"} and suffixes & {".lokr_w2", ".lokr_w2_a"}
    else:
        assert suffixes == SUFFIXES[case]
    assert any(key.startswith(CONV + ".") for key in state)
    want = outputs(unet)

    path = tmp_path / "unet-2.safetensors"
    save_lora(path, state, lora_metadata("unet", "tiny", groups, step=2))
    loaded, metadata = load_lora(path)
    assert '"type": "%s"' % CASES[case].get("type", "lora") in metadata["groups"]

    again = tiny_unet_factory()
    attach_lora(again, [groups[0].spec], "unet", "lora_unet")
    load_lora_into(again, loaded)
    for name, output in outputs(again).items():
        torch.testing.assert_close(output, want[name])

    plain = tiny_unet_factory()
    merge_lora(plain, loaded)
    for name, output in outputs(plain).items():
        torch.testing.assert_close(output, want[name], atol=1e-5, rtol=1e-5)


def lycoris_delta_weight(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The merged weight as ComfyUI / the webui's LyCORIS code computes it from webui tensors (written out here)."""
    alpha = parts.get(".alpha")
    if ".hada_w1_a" in parts:
        scale = float(alpha) / parts[".hada_w1_b"].shape[0]
        delta = (parts[".hada_w1_a"] @ parts[".hada_w1_b"]) * (parts[".hada_w2_a"] @ parts[".hada_w2_b"])
        return weight + scale * delta.reshape(weight.shape)
    if ".lokr_w1" in parts or ".lokr_w1_a" in parts:
        dim = None
        w1 = parts.get(".lokr_w1")
        if w1 is None:
            dim, w1 = parts[".lokr_w1_b"].shape[0], parts[".lokr_w1_a"] @ parts[".lokr_w1_b"]
        w2 = parts.get(".lokr_w2")
        if w2 is None:
            dim, w2 = parts[".lokr_w2_b"].shape[0], parts[".lokr_w2_a"] @ parts[".lokr_w2_b"]
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        if weight.dim() == 4:
            w1 = w1[:, :, None, None]
            w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:]) if w2.dim() == 2 else w2
        return weight + scale * torch.kron(w1, w2).reshape(weight.shape)
    down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * float(alpha) / down.shape[0]
    calc = weight + delta
    if ".dora_scale" in parts:  # LyCORIS / peft DoRA on the output axis (ComfyUI divides by the base weight's norm)
        norm = calc.reshape(calc.shape[0], -1).norm(dim=1, keepdim=True).reshape(parts[".dora_scale"].shape)
        calc = calc * (parts[".dora_scale"] / norm)
    return calc


@pytest.mark.parametrize("case", list(CASES))
def test_webui_export_has_lycoris_keys_with_the_same_effect(case: str, tiny_unet_factory) -> None:
    unet = tiny_unet_factory()
    trained(unet, case)
    state = lora_state_dict(unet)
    webui = native_to_webui(state, "unet")
    plain = tiny_unet_factory()
    merged = tiny_unet_factory()
    merge_lora(merged, state)
    for name in (TO_K, CONV):
        prefix = "lora_unet_" + name.replace(".", "_")
        parts = {key[len(prefix):]: tensor for key, tensor in webui.items() if key.startswith(prefix + ".")}
        if case == "loha":
            assert {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"} == set(parts)
        if case == "dora":
            assert ".dora_scale" in parts and parts[".dora_scale"].shape[0] == parts[".lora_up.weight"].shape[0]
        base = plain.get_submodule(name).weight
        expected = merged.get_submodule(name).weight
        torch.testing.assert_close(lycoris_delta_weight(parts, base), expected, atol=1e-5, rtol=1e-5)


def test_bad_type_and_dora_on_loha_are_config_errors(tiny_unet) -> None:
    with pytest.raises(ConfigError, match=r"lora_unet\[0\]\.type: expected one of lora, loha, lokr, got 'lycoris'"):
        attach_lora(tiny_unet, [LoraGroupSpec(lr=1, layers=PATTERNS, type="lycoris")], "unet", "lora_unet")
    with pytest.raises(ConfigError, match=r"lora_unet\[0\]\.dora: DoRA is a LoRA variant"):
        attach_lora(tiny_unet, [LoraGroupSpec(lr=1, layers=PATTERNS, type="loha", dora=True)], "unet", "lora_unet")


def test_groups_of_different_types_in_one_model(tiny_unet_factory) -> None:
    unet = tiny_unet_factory()
    groups = attach_lora(unet, [
        LoraGroupSpec(lr=1e-4, layers=[r"re:.*attn1\.to_k$"], rank=4),
        LoraGroupSpec(lr=2e-4, layers=[r"re:.*attn1\.to_v$"], rank=4, type="loha"),
        LoraGroupSpec(lr=3e-4, layers=[r"re:.*resnets\.0\.conv1$"], rank=2, type="lokr"),
    ], "unet", "lora_unet")
    assert all(group.params and all(p.requires_grad for p in group.params) for group in groups)
    state = lora_state_dict(unet)
    assert any(k.endswith("to_k.lora_A.weight") for k in state) and any(k.endswith("to_v.hada_w1_a") for k in state)
    assert any(k.endswith("conv1.rank") for k in state)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in groups for p in group.params}


def test_lora_convert_to_webui_writes_a_lycoris_file(tiny_unet_factory, tmp_path: Path) -> None:
    from safetensors import safe_open

    from hcpdiff.tools.lora_convert import main

    unet = tiny_unet_factory()
    groups = trained(unet, "loha")
    native = tmp_path / "unet-2.safetensors"
    save_lora(native, lora_state_dict(unet), lora_metadata("unet", "tiny", groups, step=2))
    out = tmp_path / "loha_webui.safetensors"
    assert main(["--to_webui", "--lora_path", str(native), "--dump_path", str(out)]) == 0
    with safe_open(str(out), "pt") as opened:
        keys = set(opened.keys())
        assert opened.metadata()["ss_network_module"] == "lycoris.kohya"
    name = "lora_unet_" + TO_K.replace(".", "_")
    assert {f"{name}.hada_w1_a", f"{name}.hada_w1_b", f"{name}.hada_w2_a", f"{name}.hada_w2_b", f"{name}.alpha"} <= keys


@pytest.mark.parametrize("case", [case for case in CASES if case != "dora"])
def test_lora_convert_webui_round_trip_keeps_every_adapter_type(case: str, tiny_unet_factory, tiny_model_dir,
                                                                 tmp_path: Path) -> None:
    """native -> webui / LyCORIS -> native: the same weights, and the visualizer's merge gives the same layers."""
    from hcpdiff.tools.lora_convert import main

    unet = tiny_unet_factory()
    groups = trained(unet, case)
    state = lora_state_dict(unet)
    native = tmp_path / "unet-2.safetensors"
    save_lora(native, state, lora_metadata("unet", "tiny", groups, step=2))
    webui = tmp_path / "webui.safetensors"
    assert main(["--to_webui", "--lora_path", str(native), "--dump_path", str(webui)]) == 0
    assert main(["--from_webui", "--lora_path", str(webui), "--dump_path", str(tmp_path / "back"),
                 "--model", str(tiny_model_dir)]) == 0
    back, metadata = load_lora(tmp_path / "back" / "unet-webui.safetensors")
    assert f'"type": "{CASES[case].get("type", "lora")}"' in metadata["groups"]
    plain, merged = tiny_unet_factory(), tiny_unet_factory()
    merge_lora(plain, state)
    merge_lora(merged, back)
    for name in (TO_K, CONV):
        torch.testing.assert_close(merged.get_submodule(name).weight, plain.get_submodule(name).weight)
    if case != "lokr":  # a LoKr whose factors are both full carries its scale in lokr_w1 in webui files
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_to_webui_refuses_dora_in_one_line_naming_each_tool(cli_in_process, tiny_unet_factory, tmp_path: Path) -> None:
    """No webui file renders peft's DoRA in both ComfyUI (base-weight norm) and A1111 (per-input-column scale only)."""
    unet = tiny_unet_factory()
    groups = trained(unet, "dora")
    save_lora(tmp_path / "unet-2.safetensors", lora_state_dict(unet), lora_metadata("unet", "tiny", groups, step=2))
    done = cli_in_process(["-m", "hcpdiff.tools.lora_convert", "--to_webui", "--lora_path", "unet-2.safetensors",
                           "--dump_path", "webui.safetensors"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert all(word in lines[0] for word in ("DoRA", "ComfyUI", "A1111", "base weight's norm", "input column"))
    assert not (tmp_path / "webui.safetensors").exists()


def test_from_webui_reads_lycoris_files_other_trainers_wrote(cli_in_process, tiny_unet_factory, tiny_model_dir,
                                                           tmp_path: Path) -> None:
    """Hand-built LyCORIS layers in kohya naming: LoHa without alpha (scale 1), LoKr with a decomposed w2 and an alpha."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    loha, lokr = "lora_unet_" + TO_K.replace(".", "_"), "lora_unet_" + CONV.replace(".", "_")
    unet = tiny_unet_factory()
    out_k, in_k = unet.get_submodule(TO_K).weight.shape
    conv_weight = unet.get_submodule(CONV).weight
    webui = {f"{loha}.hada_w1_a": rand(out_k, 2), f"{loha}.hada_w1_b": rand(2, in_k),
             f"{loha}.hada_w2_a": rand(out_k, 2), f"{loha}.hada_w2_b": rand(2, in_k)}
    # peft's LoKr factorisation of a 32 -> 32 3x3 conv: w1 [4, 4], w2 = w2_a [8, r] @ w2_b [r, 8 * 3 * 3]
    webui.update({f"{lokr}.lokr_w1": rand(4, 4), f"{lokr}.lokr_w2_a": rand(8, 2), f"{lokr}.lokr_w2_b": rand(2, 72),
                  f"{lokr}.alpha": torch.tensor(1.0)})
    save_file(webui, str(tmp_path / "lycoris.safetensors"))
    done = cli_in_process(["-m", "hcpdiff.tools.lora_convert", "--from_webui", "--lora_path", "lycoris.safetensors",
                           "--dump_path", "out", "--model", str(tiny_model_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    state, _ = load_lora(tmp_path / "out" / "unet-lycoris.safetensors")
    assert float(state[f"{TO_K}.alpha"]) == 2.0 and int(state[f"{CONV}.rank"]) == 2
    merge_lora(unet, state)
    for name, prefix, weight in ((TO_K, loha, None), (CONV, lokr, conv_weight)):
        base = tiny_unet_factory().get_submodule(name).weight
        parts = {key[len(prefix):]: t for key, t in webui.items() if key.startswith(prefix + ".")}
        want = lycoris_delta_weight({**parts, ".alpha": parts.get(".alpha", torch.tensor(2.0))}, base)
        torch.testing.assert_close(unet.get_submodule(name).weight, want, atol=1e-5, rtol=1e-5)


def test_from_webui_names_a_dora_scale_over_input_columns(cli_in_process, tiny_model_dir, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    name = "lora_unet_" + TO_K.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 64), f"{name}.lora_up.weight": torch.zeros(64, 2),
               f"{name}.dora_scale": torch.ones(1, 64)}, str(tmp_path / "dora.safetensors"))
    done = cli_in_process(["-m", "hcpdiff.tools.lora_convert", "--from_webui", "--lora_path", "dora.safetensors",
                           "--dump_path", "out", "--model", str(tiny_model_dir)], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and name in last and "output row" in last, done.stderr
