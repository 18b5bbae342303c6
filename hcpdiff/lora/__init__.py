"""LoRA: layer selection, peft adapter attachment, native checkpoint I/O and merging."""
from hcpdiff.lora.attach import attach_lora
from hcpdiff.lora.layer_select import select_layers
from hcpdiff.lora.merge import merge_full_weights, merge_lora
from hcpdiff.lora.spec import AttachedGroup, LoraGroupSpec
from hcpdiff.lora.state_io import load_checkpoint, load_lora, load_lora_into, lora_metadata, lora_state_dict, save_lora

__all__ = [
    "AttachedGroup",
    "LoraGroupSpec",
    "attach_lora",
    "load_checkpoint",
    "load_lora",
    "load_lora_into",
    "lora_metadata",
    "lora_state_dict",
    "merge_full_weights",
    "merge_lora",
    "save_lora",
    "select_layers",
]
