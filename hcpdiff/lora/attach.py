"""Attach one peft LoRA adapter per group to a model, each on exactly the layers its patterns select."""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from numbers import Real

from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.lora.layer_select import select_layers
from hcpdiff.lora.spec import AttachedGroup, LoraGroupSpec
from hcpdiff.lora.state_io import adapter_tensors

logger = logging.getLogger(__name__)

ADAPTER_TYPES = ("lora", "loha", "lokr")


def exact_names_regex(names: list[str]) -> str:
    """A peft `target_modules` string matching exactly these dotted names (peft full-matches a string).

    A list would be matched by suffix (`attn1.to_k` also hits `x.attn1.to_k`), hence the regex.
    """
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def exact_pattern_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key for one layer; peft matches keys as `(.*\\.)?KEY$`, `^` stops the prefix."""
    return "^" + re.escape(name)


def layer_width(layer: nn.Module) -> tuple[int, int]:
    """(output width, largest useful rank) of a Linear or Conv2d layer."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, min(layer.in_features, layer.out_features)
    kernel_area = layer.kernel_size[0] * layer.kernel_size[1]
    return layer.out_channels, min(layer.in_channels // layer.groups * kernel_area, layer.out_channels)


def check_spec(spec: LoraGroupSpec, label: str) -> None:
    """Reject ranks, alphas and dropouts that cannot work, naming the group."""
    rank = spec.rank
    if isinstance(rank, bool) or not isinstance(rank, Real):
        raise ConfigError(f"{label}.rank: expected an int >= 1 or a ratio in (0, 1], got {rank!r}.")
    if isinstance(rank, int) and rank < 1:
        raise ConfigError(f"{label}.rank: expected an int >= 1 or a ratio in (0, 1], got {rank}.")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ConfigError(
            f"{label}.rank: a float rank is a ratio of the layer width and must be in (0, 1], got {rank} "
            "(write an int for an absolute rank)."
        )
    if spec.alpha is not None and (isinstance(spec.alpha, bool) or not isinstance(spec.alpha, Real) or spec.alpha <= 0):
        raise ConfigError(f"{label}.alpha: expected a number > 0 or null (alpha = rank), got {spec.alpha!r}.")
    if not 0 <= spec.dropout < 1:
        raise ConfigError(f"{label}.dropout: expected a value in [0, 1), got {spec.dropout!r}.")
    if spec.type not in ADAPTER_TYPES:
        raise ConfigError(f"{label}.type: expected one of {', '.join(ADAPTER_TYPES)}, got {spec.type!r}.")
    if spec.dora and spec.type != "lora":
        raise ConfigError(f"{label}.dora: DoRA is a LoRA variant; it needs type: lora, not {spec.type!r}.")
    if spec.dropout and spec.type != "lora":
        raise ConfigError(f"{label}.dropout: input dropout exists for type: lora only; set it to 0 for {spec.type}.")
    if isinstance(spec.layers, str) or not spec.layers:
        raise ConfigError(f"{label}.layers: expected a non-empty list of patterns, got {spec.layers!r}.")


def layer_ranks(model: nn.Module, layers: list[str], spec: LoraGroupSpec, label: str) -> dict[str, int]:
    """Rank of each layer: the int rank, or the ratio times the layer's output width (at least 1)."""
    ranks: dict[str, int] = {}
    for name in layers:
        width, max_rank = layer_width(model.get_submodule(name))
        if isinstance(spec.rank, float):
            # a ratio of a wide-output layer (GEGLU: out 8x in) can pass min(in, out), which adds nothing
            ranks[name] = min(max_rank, max(1, round(spec.rank * width)))
            continue
        rank = spec.rank
        if rank > max_rank:
            raise ConfigError(
                f"{label}.rank: rank {rank} exceeds what layer '{name}' can use ({max_rank}); "
                "use a smaller rank or a ratio such as 0.25."
            )
        ranks[name] = rank
    return ranks


def lora_config(spec: LoraGroupSpec, ranks: dict[str, int]) -> LoraConfig | LoHaConfig | LoKrConfig:
    """The peft config of one group: its adapter type, exactly its layers, per-layer rank / alpha where they differ."""
    alphas = {name: float(spec.alpha if spec.alpha is not None else rank) for name, rank in ranks.items()}
    first = next(iter(ranks))
    uniform = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    common = {
        "r": ranks[first],
        "target_modules": exact_names_regex(list(ranks)),
        "rank_pattern": {} if uniform else {exact_pattern_key(name): rank for name, rank in ranks.items()},
        "alpha_pattern": {} if uniform else {exact_pattern_key(name): alpha for name, alpha in alphas.items()},
    }
    if spec.type == "loha":
        return LoHaConfig(alpha=alphas[first], **common)
    if spec.type == "lokr":
        return LoKrConfig(alpha=alphas[first], **common)
    return LoraConfig(lora_alpha=alphas[first], lora_dropout=spec.dropout, use_dora=spec.dora, bias="none", **common)


def attach_lora(model: nn.Module, groups: list[LoraGroupSpec], part: str, where: str,
                unused: Collection[str] = ()) -> list[AttachedGroup]:
    """Inject one adapter per group (named `{part}_g{i}`), freeze the base model and return each group's params.

    `unused` layers (whose outputs the model discards: an adapter there would never train) are left out of the
    groups' matches, with one log line; a group matching nothing else is one ConfigError."""
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ModelError(f"{where}: the {part} already has LoRA adapters attached; attach all groups in one call.")
    claimed_by: dict[str, str] = {}
    plans: list[tuple[str, LoraGroupSpec, dict[str, int]]] = []
    for index, spec in enumerate(groups):
        label = f"{where}[{index}]"
        check_spec(spec, label)
        layers = select_layers(model, list(spec.layers), f"{label}.layers")
        if left_out := [name for name in layers if name in unused]:
            layers = [name for name in layers if name not in unused]
            if not layers:
                raise ConfigError(f"{label}.layers: matches only layers whose outputs the {part} discards "
                                  f"({left_out[0]}, ...); an adapter there would never train")
            logger.info("%s: %d matched layer(s) left out, the %s discards their outputs: %s", label, len(left_out),
                        part, ", ".join(left_out[:4]) + (", ..." if len(left_out) > 4 else ""))
        for name in layers:
            if name in claimed_by:
                raise ConfigError(
                    f"layer '{name}' is claimed by both {claimed_by[name]} and {label}; give it to one group."
                )
            claimed_by[name] = label
        plans.append((f"{part}_g{index}", spec, layer_ranks(model, layers, spec, label)))

    model.requires_grad_(False)
    for adapter_name, spec, ranks in plans:
        with warnings.catch_warnings():
            # expected: every group after the first is one more adapter on the same model
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(lora_config(spec, ranks), model, adapter_name=adapter_name)
    adapter_names = [adapter_name for adapter_name, _, _ in plans]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            # each injection left only its own adapter active on every LoRA layer; a layer skips adapters it
            # lacks, so activating all names gives each layer its group's adapter (and makes it trainable)
            module.set_adapter(adapter_names)
    for adapter_name, _, ranks in plans:
        check_injected(model, adapter_name, ranks)
    return [
        AttachedGroup(
            name=adapter_name, lr=spec.lr, layers=list(ranks), params=adapter_params(model, adapter_name), spec=spec
        )
        for adapter_name, spec, ranks in plans
    ]


def check_injected(model: nn.Module, adapter_name: str, ranks: dict[str, int]) -> None:
    """Guard against peft changing how it matches names: every planned layer has the adapter at its planned rank."""
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, BaseTunerLayer) or getattr(layer, "r", {}).get(adapter_name) != rank:
            raise RuntimeError(f"peft did not give layer '{name}' adapter {adapter_name} at rank {rank}")


def adapter_params(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trained weights of one adapter (lora_A / lora_B, DoRA magnitudes, hada_* or lokr_*), in model order."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            params += list(adapter_tensors(module, adapter_name).values())
    return params


@contextmanager
def adapters_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The modules run as their base weights inside the block (every peft adapter layer bypassed, as peft's own
    `disable_adapter` does); adapters and each parameter's requires_grad are as before afterwards."""
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    trainable = {param: param.requires_grad for layer in layers for param in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in trainable.items():
            param.requires_grad_(requires_grad)
