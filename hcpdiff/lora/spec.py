"""One LoRA group as the config describes it, and the group once attached to a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from torch import nn

from hcpdiff.config.fields import Bound

# A negative lr trains away from the data; 0 keeps the group's weights as they start (shared with full fine-tuning).
GROUP_LR = Bound(ge=0, finite=True, note="0 keeps the group frozen")


@dataclass
class LoraGroupSpec:
    """One entry of `lora_unet` / `lora_text_encoder`."""

    lr: Annotated[float, GROUP_LR]  # learning rate of this group's optimizer param group
    layers: list[str]  # `re:REGEX` full-matches a dotted name; a plain string is one exact name ('' = whole model)
    rank: Annotated[int | float, Bound(gt=0, finite=True)] = 4  # int >= 1, or a float in (0, 1]: that fraction of each layer's output width
    alpha: Annotated[float | None, Bound(finite=True)] = None  # LoRA scale is alpha / rank; None means alpha = rank (scale 1)
    dropout: Annotated[float, Bound(ge=0, lt=1)] = 0.0  # dropout on the LoRA branch input while training
    type: str = "lora"  # adapter kind through peft: lora | loha (Hadamard product) | lokr (Kronecker product)
    dora: bool = False  # lora only: weight-decomposed LoRA (peft use_dora), a trained magnitude per output row


@dataclass
class AttachedGroup:
    """A group after attach_lora: its peft adapter name, matched layers and trainable parameters."""

    name: str  # peft adapter name, f"{part}_g{index}"
    lr: float  # from the spec
    layers: list[str]  # dotted names of the adapted layers in the plain model
    params: list[nn.Parameter] = field(repr=False)  # lora_A / lora_B weights: one optimizer param group
    spec: LoraGroupSpec  # the config entry it came from (written to checkpoint metadata)
