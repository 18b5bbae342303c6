"""LoRA: layer selection, peft adapter attachment, native checkpoint I/O and merging.

Names are imported on first use: reading and converting LoRA files needs safetensors, not peft (seconds to import).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "attach_lora": "attach",
    "select_layers": "layer_select",
    "merge_full_weights": "merge",
    "merge_lora": "merge",
    "AttachedGroup": "spec",
    "LoraGroupSpec": "spec",
    "load_checkpoint": "state_io",
    "load_lora": "state_io",
    "load_lora_into": "state_io",
    "lora_metadata": "state_io",
    "lora_state_dict": "state_io",
    "save_lora": "state_io",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'hcpdiff.lora' has no attribute {name!r}")
    return getattr(import_module(f"hcpdiff.lora.{_HOMES[name]}"), name)
