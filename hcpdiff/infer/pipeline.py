"""Build the diffusers pipeline once: base parts, replaced components, LoRAs merged into the weights."""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from hcpdiff.config import instantiate, read_fields
from hcpdiff.errors import ConfigError
from hcpdiff.families import Family
from hcpdiff.families.base import Expert
from hcpdiff.infer.specs import LoraItem, MergeGroup
from hcpdiff.lora import load_checkpoint, merge_full_weights, merge_lora
from hcpdiff.lora.layer_select import pattern_selects
from hcpdiff.lora.state_io import layer_states, same_base_model
from hcpdiff.models.parts import ModelParts

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PART_ALIASES = {"TE": "text_encoder", "TE2": "text_encoder_2"}  # merge group types as HCP v1 wrote them


def inference_scheduler(parts: ModelParts) -> Any:
    """The sampler the model ships (scheduler_config.json's class), with its config."""
    import diffusers

    config = dict(parts.noise_scheduler.config)
    try:
        shipped = diffusers.DDPMScheduler.load_config(parts.name_or_path, subfolder="scheduler", local_files_only=True)
        config, class_name = shipped, shipped.get("_class_name", "DDPMScheduler")
    except (OSError, ValueError):  # a single checkpoint file: the family's training scheduler, as loaded
        class_name = type(parts.noise_scheduler).__name__
    return getattr(diffusers, class_name, type(parts.noise_scheduler)).from_config(config)


def zero_snr_sampler(scheduler: Any, key: str) -> Any:
    """The sampler with zero-terminal-SNR betas and `trailing` timesteps (the first step at the pure-noise timestep), as
    Lin et al. 2024 sample a model trained with them. PNDM (SD1.5's default) has no such option and becomes DDIM over
    the same betas; any other sampler without one (flow matching, LMS) is one ConfigError naming `key`."""
    import inspect

    import diffusers

    if isinstance(scheduler, diffusers.PNDMScheduler):
        scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
    if "rescale_betas_zero_snr" not in inspect.signature(type(scheduler).__init__).parameters:
        raise ConfigError(f"{key}: the sampler {type(scheduler).__name__} has no zero-terminal-SNR option; use a DDPM "
                          "sampler that has one (DDIM, Euler, DPM++, UniPC), e.g. through new_components.scheduler")
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def build_pipeline(parts: ModelParts, new_components: DictConfig | dict, zero_terminal_snr: bool = False) -> Any:
    """The family's diffusers pipeline of the loaded parts; `new_components.<name>` nodes replace parts (scheduler,
    vae, ...); with `zero_terminal_snr` the sampler's betas are rescaled (see zero_snr_sampler)."""
    components = {**parts.components, "scheduler": inference_scheduler(parts)}
    for name, node in (new_components or {}).items():
        if name not in components:
            raise ConfigError(f"`new_components.{name}`: unknown component; use one of {sorted(components)}.")
        components[name] = instantiate(node, f"new_components.{name}")
    scheduler = components.pop("scheduler")
    if zero_terminal_snr:
        scheduler = zero_snr_sampler(scheduler, "zero_terminal_snr")
    pipe = parts.family.build_pipeline(components, scheduler)
    parts.family.configure_pipeline(pipe, parts.pipeline_settings)
    return pipe


def layer_matches(layer: str, patterns: list[str], where: str) -> bool:
    """True when one of `patterns` selects the layer as training's `layers:` does (the layer or a module holding it)."""
    return any(pattern_selects(pattern, layer, f"`{where}.layers`") for pattern in patterns)


def select_lora_layers(state: dict[str, torch.Tensor], layers: Any, where: str) -> dict[str, torch.Tensor]:
    """The part of a native state whose layers the `layers` setting keeps (`all` keeps everything)."""
    if layers == "all":
        return state
    patterns = [layers] if isinstance(layers, str) else list(layers)
    kept = {key: t for key, t in state.items()
            if layer_matches(key.rsplit(".", 2 if key.endswith("weight") else 1)[0], patterns, where)}
    if not kept:
        raise ConfigError(f"`{where}.layers`: {patterns} match no layer of the LoRA file.")
    return kept


def select_full_tensors(full: dict[str, torch.Tensor], layers: Any, where: str) -> dict[str, torch.Tensor]:
    """The fully trained tensors whose module the `layers` setting keeps (`all` keeps everything)."""
    if layers == "all":
        return full
    patterns = [layers] if isinstance(layers, str) else list(layers)
    return {key: t for key, t in full.items() if layer_matches(key.rsplit(".", 1)[0], patterns, where)}


def merge_groups_of(merge: Any) -> list[tuple[str, Any]]:
    """(key path, node) of each merge group; `merge` is a mapping of named groups or a list."""
    if merge is None:
        return []
    if isinstance(merge, (DictConfig, dict)):
        return [(f"merge.{name}", node) for name, node in merge.items()]
    if isinstance(merge, (ListConfig, list)):
        return [(f"merge.{i}", node) for i, node in enumerate(merge)]
    raise ConfigError("`merge`: expected a mapping of groups ({type, base_model_alpha, lora: [...]}) or null.")


def merge_all(pipe: Any, merge: Any, family: Family, base_model: str = "",
              experts: tuple[Expert, ...] = ()) -> list[str]:
    """Merge every group's LoRAs into the pipeline's weights (alpha 0 leaves them exactly as they were); returns paths.

    A group's `type` names the part it merges into (unet, transformer, text_encoder, ..., or v1's TE / TE2). A LoRA
    whose `base_model` metadata names another model than `base_model` (see same_base_model) gets one warning. A
    denoiser LoRA whose metadata names one of the model's `experts` (Wan2.2 A14B's low_noise) merges into that
    expert (transformer_2).
    """
    merged_paths: list[str] = []
    for where, node in merge_groups_of(merge):
        group = read_fields(node, where, MergeGroup)
        part = PART_ALIASES.get(group.type, group.type)
        if part not in family.trainable_parts:
            aliases = [alias for alias, name in PART_ALIASES.items() if name in family.trainable_parts]
            raise ConfigError(f"`{where}.type`: '{group.type}' is not a part of this {family.description} model; "
                              f"use one of {', '.join([*family.trainable_parts, *aliases])}.")
        model = getattr(pipe, part, None)
        if model is None:
            why = "drop_t5: true" if part in family.t5_parts else "no `controlnet:` entry names one"
            raise ConfigError(f"`{where}.type`: the {part} is not loaded ({why}), so nothing can merge into it.")
        items = [read_fields(item, f"{where}.lora.{i}", LoraItem) for i, item in enumerate(group.lora)]
        loaded = []
        for i, item in enumerate(items):
            if item.path:
                state, full, metadata = load_checkpoint(item.path)
                trained_on = metadata.get("base_model", "")
                if not same_base_model(trained_on, base_model):
                    logging.getLogger("hcpdiff.infer").warning(
                        "warning: LoRA file '%s' was trained on '%s', not on '%s'; it may not fit this model.",
                        item.path, trained_on, base_model)
                target = expert_target(pipe, model, metadata.get("expert"), experts, f"{where}.lora.{i}.path",
                                       str(item.path)) if part == family.denoiser else model
                loaded.append((item, state, full, target))
        if group.base_model_alpha != 1.0:
            for target in {id(target): target for *_, target in loaded}.values():
                scale_base(target, {layer for _, state, _, t in loaded if t is target for layer in layer_states(state)},
                           group.base_model_alpha)
        for i, (item, state, full, target) in enumerate(loaded):
            # Fully fine-tuned tensors (unet: / text_encoder: groups) blend as base + alpha * (trained - base).
            if full and item.alpha != 0:
                merge_full_weights(target, select_full_tensors(full, item.layers, f"{where}.lora.{i}"), item.alpha,
                                   str(item.path))
            if state and item.alpha != 0:
                merge_lora(target, select_lora_layers(state, item.layers, f"{where}.lora.{i}"), item.alpha,
                           source=str(item.path))
            merged_paths.append(str(item.path))
    return merged_paths


def expert_target(pipe: Any, denoiser: torch.nn.Module, expert: str | None, experts: tuple[Expert, ...], where: str,
                  path: str) -> torch.nn.Module:
    """The denoiser a LoRA merges into: the expert its metadata names (`expert`), else the pipeline's denoiser; an
    expert the model lacks is one ConfigError."""
    if expert is None:
        return denoiser
    chosen = next((candidate for candidate in experts if candidate.name == expert), None)
    if chosen is None:
        has = f"its experts are {', '.join(e.name for e in experts)}" if experts else "it has one denoiser"
        raise ConfigError(f"`{where}`: '{path}' was trained on the {expert} expert of a model with denoising "
                          f"experts, which this model lacks ({has}); render it with that model.")
    return getattr(pipe, chosen.folder)


def scale_base(model: torch.nn.Module, layers: set[str], factor: float) -> None:
    """Multiply the base weights of the given layers by `factor`."""
    with torch.no_grad():
        for layer in layers:
            model.get_submodule(layer).weight.mul_(factor)


def to_plain(node: Any) -> Any:
    """A config node as plain Python values."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
