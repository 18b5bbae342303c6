"""Every layer of a --to_webui file, rebuilt with LyCORIS's own weight functions (lycoris-lora), equals hcpdiff's
merge: LoRA / LoCon, LoHa, LoKr and DoRA, U-Net and text encoders, SD1.x and SDXL."""
from __future__ import annotations

import pytest
import torch

from interop_helpers import layer_weight

lycoris_functional = pytest.importorskip("lycoris.functional", reason="lycoris-lora is not installed (pip install lycoris-lora)")


def lycoris_weight(parts: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The merged weight LyCORIS computes from one layer's webui tensors."""
    from lycoris.functional import locon, loha, lokr
    from lycoris.functional.general import weight_decompose

    alpha = parts.get(".alpha")
    if ".hada_w1_a" in parts:
        rank = parts[".hada_w1_b"].shape[0]
        gamma = float(alpha) / rank if alpha is not None else 1.0
        delta = loha.diff_weight(parts[".hada_w1_b"], parts[".hada_w1_a"], parts[".hada_w2_b"], parts[".hada_w2_a"],
                                 None, None, gamma=gamma, backend="torch")
    elif any(key.startswith(".lokr_") for key in parts):
        # lycoris.functional.lokr divides gamma by the rank itself (rank_scale), and uses scale 1 without a factor
        factor_b = parts.get(".lokr_w1_b", parts.get(".lokr_w2_b"))
        gamma = float(alpha) if alpha is not None else float(factor_b.shape[0]) if factor_b is not None else 1.0
        delta = lokr.diff_weight(parts.get(".lokr_w1"), parts.get(".lokr_w1_a"), parts.get(".lokr_w1_b"),
                                 parts.get(".lokr_w2"), parts.get(".lokr_w2_a"), parts.get(".lokr_w2_b"), None,
                                 gamma=gamma, backend="torch")
    else:
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        gamma = float(alpha) / down.shape[0] if alpha is not None else 1.0
        delta = locon.diff_weight(down, up, None, gamma=gamma, backend="torch")
    merged = base + delta.reshape(base.shape)
    if ".dora_scale" in parts:  # LyCORIS DoRA with wd_on_out (a magnitude per output row), as peft's
        merged = weight_decompose(merged, parts[".dora_scale"].to(torch.float32), wd_on_out=True, backend="torch")
    return merged


def test_lycoris_rebuilds_hcpdiffs_merge_for_every_layer(case) -> None:
    from hcpdiff.lora.webui_format import SDXL_WEBUI_PREFIX, WEBUI_PREFIX, split_webui_key, webui_name_map
    from hcpdiff.tools.lora_convert import meta_models, unet_ldm_renames

    prefixes = SDXL_WEBUI_PREFIX if case.family == "sdxl" else WEBUI_PREFIX
    renames = unet_ldm_renames(meta_models(str(case.model_dir))) if case.family == "sdxl" else None
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in case.webui.items():
        layer, suffix = split_webui_key(key)
        by_layer.setdefault(layer, {})[suffix] = tensor.to(torch.float32)
    checked = 0
    for part in case.native:
        names = webui_name_map(case.layers(part), part, prefixes, renames if part == "unet" else None)
        for layer, webui_layer in names.items():
            base = layer_weight(case.base[part], layer)
            want = layer_weight(case.merged[part], layer)
            got = lycoris_weight(by_layer.pop(webui_layer), base)
            assert not torch.equal(want, base), layer
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{part} {layer}")
            checked += 1
    assert not by_layer, f"webui layers no native layer explains: {sorted(by_layer)[:3]}"
    assert checked > 50
