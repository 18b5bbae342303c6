"""One layer's native adapter weights as the webui / ComfyUI (kohya LoRA, LyCORIS LoHa / LoKr, DoRA) suffixes.

LoHa and LoKr tensors keep peft's names, which are LyCORIS's (`hada_w1_a` [out, r], `hada_w1_b` [r, in], ...;
`lokr_w1`, `lokr_w2`, or their `_a` / `_b` factors); the readers scale by alpha / r with r read from a `_b` factor.
A LoKr with both Kronecker factors full has no `_b` factor, so the readers use scale 1: its alpha / rank is folded
into `lokr_w1` and no alpha is written. DoRA's magnitude (one per output row) is written as `dora_scale`, shaped
[out, 1] (Linear) or [out, 1, 1, 1] (Conv2d), which ComfyUI reads as a norm over each output row, as peft's DoRA is.
"""
from __future__ import annotations

import torch

from hcpdiff.lora.state_io import layer_kind

LORA_SUFFIX = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".alpha": ".alpha"}


def webui_tensors(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{webui suffix: tensor} of one layer's native weights (see the module docstring for each type)."""
    kind = layer_kind(parts)
    if kind == "lora":
        out = {LORA_SUFFIX[s]: t for s, t in parts.items() if s in LORA_SUFFIX}
        if ".lora_magnitude_vector.weight" in parts:
            magnitude = parts[".lora_magnitude_vector.weight"]
            out[".dora_scale"] = magnitude.reshape(-1, *[1] * (parts[".lora_A.weight"].dim() - 1)).clone()
        return out
    out = {s: t for s, t in parts.items() if s != ".rank"}
    if kind == "lokr" and ".lokr_w1" in parts and ".lokr_w2" in parts:
        scale = float(parts[".alpha"]) / float(parts[".rank"])
        out[".lokr_w1"] = (parts[".lokr_w1"].to(torch.float32) * scale).to(parts[".lokr_w1"].dtype)
        del out[".alpha"]
    return out

