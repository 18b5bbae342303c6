"""Full fine-tuning groups: `unet:` / `text_encoder:` entries train a model's own weights, chosen by layer patterns.

Patterns are the LoRA groups' (`re:` full-matches a dotted module name, a plain string is one exact name, `''` is
the whole model); every parameter inside a matched module trains, norms and biases included. The trained tensors
are saved under the model's own parameter names, so `model.load_state_dict(file, strict=False)` takes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import nn

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.lora.layer_select import close_names, match_modules
from hcpdiff.lora.spec import GROUP_LR

@dataclass
class FinetuneGroupSpec:
    """One entry of `unet:` / `text_encoder:` / `text_encoder_2:`."""

    lr: Annotated[float, GROUP_LR]  # learning rate of this group's optimizer param group
    layers: list[str]  # same patterns as LoRA groups; every parameter inside a matched module is trained


@dataclass
class FinetuneGroup:
    """A group's selected parameters, keyed by their names in the plain (adapter-free) model."""

    name: str  # `unet[0]`: also the optimizer param group's name
    lr: float
    layers: list[str]  # modules the patterns matched
    named_params: dict[str, nn.Parameter] = field(repr=False)
    spec: FinetuneGroupSpec

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.named_params.values())


def select_finetune_groups(model: nn.Module, specs: list[FinetuneGroupSpec], where: str) -> list[FinetuneGroup]:
    """Resolve each group's patterns on `model` (before adapters wrap its layers); a parameter belongs to one group."""
    modules = dict(model.named_modules())
    claimed_by: dict[str, str] = {}
    groups: list[FinetuneGroup] = []
    for index, spec in enumerate(specs):
        label = f"{where}[{index}]"
        if not spec.layers:
            raise ConfigError(f"{label}.layers: empty; give at least one pattern ('' trains the whole {where})")
        matched_modules: list[str] = []
        named: dict[str, nn.Parameter] = {}
        for pattern in spec.layers:
            matched = match_modules(modules, pattern, f"{label}.layers")
            if not matched:
                suggestions = ", ".join(close_names(modules, pattern))
                raise ConfigError(f"{label}.layers: pattern '{pattern}' matches no module; close real names: {suggestions}.")
            found = {name: p for module in matched for name, p in modules[module].named_parameters(prefix=module)}
            if not found:
                raise ConfigError(f"{label}.layers: pattern '{pattern}' matches {matched[0]}, which has no parameters.")
            matched_modules += matched
            named.update(found)
        for name in named:
            if name in claimed_by:
                raise ConfigError(f"parameter '{name}' is claimed by both {claimed_by[name]} and {label}; "
                                  "give it to one group.")
            claimed_by[name] = label
        groups.append(FinetuneGroup(label, spec.lr, matched_modules, named, spec))
    return groups


def enable_finetuning(groups: list[FinetuneGroup]) -> None:
    """Make the groups' parameters trainable (after LoRA attachment froze the base model)."""
    for group in groups:
        for param in group.params:
            param.requires_grad_(True)


def finetuned_state(groups: list[FinetuneGroup]) -> dict[str, torch.Tensor]:
    """{plain parameter name: tensor} of every group."""
    return {name: param.detach() for group in groups for name, param in group.named_params.items()}


def load_finetuned(groups: list[FinetuneGroup], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved fully trained tensors back into the groups' parameters; names and shapes must match one to one."""
    params = {name: param for group in groups for name, param in group.named_params.items()}
    unknown = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unknown or missing:
        problem = f"holds '{unknown[0]}', which no group trains" if unknown else f"lacks the trained '{missing[0]}'"
        raise ModelError(f"'{source}' {problem} ({len(unknown)} unknown, {len(missing)} missing tensors).")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != params[name].shape:
                raise ModelError(f"'{source}': tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's has {tuple(params[name].shape)}.")
            params[name].copy_(tensor)

