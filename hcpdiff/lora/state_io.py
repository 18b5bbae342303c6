"""The native LoRA checkpoint: adapter weights and alphas keyed by plain layer names, in safetensors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hcpdiff.errors import ModelError
from hcpdiff.lora.spec import AttachedGroup

if TYPE_CHECKING:  # peft costs seconds to import; file I/O and conversion do not need it
    from peft.tuners.tuners_utils import BaseTunerLayer

FORMAT = "hcpdiff.lora"
FORMAT_VERSION = "1"
FULL_PARAMS_KEY = "full_params"  # metadata: JSON list of the keys that are fully trained tensors
# Weight suffixes of each adapter type: peft's own attribute names (`.weight` where peft holds a module); `.alpha` and,
# for lokr, `.rank` (a full-matrix LoKr's rank shows in no shape but sets its scale alpha / rank) are fp32 scalars.
REQUIRED_SUFFIXES = {
    "lora": (".lora_A.weight", ".lora_B.weight", ".alpha"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"),
    "lokr": (".alpha", ".rank"),
}
OPTIONAL_SUFFIXES = {
    "lora": (".lora_magnitude_vector.weight",),  # DoRA
    "loha": (".hada_t1", ".hada_t2"),
    "lokr": (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
}
KEY_SUFFIXES = tuple(sorted({s for kind in (REQUIRED_SUFFIXES, OPTIONAL_SUFFIXES) for v in kind.values() for s in v},
                            key=len, reverse=True))


def lora_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """The peft adapter layers of a model by dotted name (peft keeps the plain layer's name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def adapter_kind(layer: BaseTunerLayer) -> str:
    """"lora", "loha" or "lokr" from the peft layer's weight names."""
    names = layer.adapter_layer_names
    return "loha" if "hada_w1_a" in names else "lokr" if "lokr_w1" in names else "lora"


def adapter_tensors(layer: BaseTunerLayer, adapter: str) -> dict[str, nn.Parameter]:
    """{native suffix: parameter} of one adapter on one peft layer (`.lora_A.weight`, `.hada_w1_a`, ...)."""
    tensors: dict[str, nn.Parameter] = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if adapter not in container:
            continue
        item = container[adapter]
        if isinstance(item, nn.Parameter):
            tensors[f".{attr}"] = item
        else:
            tensors.update({f".{attr}.{name}": param for name, param in item.named_parameters()})
    return tensors


def adapter_alpha(layer: BaseTunerLayer, adapter: str) -> float:
    """The alpha of an adapter (peft calls it lora_alpha on LoRA layers, alpha on LoHa / LoKr layers)."""
    alphas = layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha
    return float(alphas[adapter])


def only_adapter(layer: BaseTunerLayer, name: str) -> str:
    """The single adapter a layer carries (attach_lora gives each layer exactly one)."""
    adapters = list(layer.r.keys())
    if len(adapters) != 1:
        raise ModelError(f"layer '{name}' carries {len(adapters)} LoRA adapters ({adapters}); expected exactly one.")
    return adapters[0]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Native keys `<layer><suffix>` (see REQUIRED_SUFFIXES) and `<layer>.alpha` from the attached adapters."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        adapter = only_adapter(layer, name)
        for suffix, param in adapter_tensors(layer, adapter).items():
            state[name + suffix] = param.detach().clone()
        state[f"{name}.alpha"] = torch.tensor(adapter_alpha(layer, adapter), dtype=torch.float32)
        if adapter_kind(layer) == "lokr":
            state[f"{name}.rank"] = torch.tensor(float(layer.r[adapter]), dtype=torch.float32)
    return state


def lora_metadata(part: str, base_model: str, groups: list[AttachedGroup], step: int, *, family: str | None = None,
                  finetune: Sequence[Any] = ()) -> dict[str, str]:
    """Checkpoint metadata (all strings): part, base model (and its family), step, the LoRA groups' settings under
    their config names (`lora_<part>[i]`), and the fully trained tensors' names and groups when `finetune` has any."""
    group_info = [
        {
            "name": f"lora_{part}[{i}]",
            "rank": group.spec.rank,
            "alpha": group.spec.alpha,
            "dropout": group.spec.dropout,
            "type": group.spec.type,
            "dora": group.spec.dora,
            "lr": group.lr,
            "patterns": list(group.spec.layers),
        }
        for i, group in enumerate(groups)
    ]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "part": part,
        "base_model": base_model,
        "groups": json.dumps(group_info),
        "step": str(step),
    }
    if family is not None:
        metadata["family"] = family
    if finetune:
        metadata[FULL_PARAMS_KEY] = json.dumps([name for group in finetune for name in group.named_params])
        metadata["full_groups"] = json.dumps([{"name": group.name, "lr": group.lr, "patterns": list(group.spec.layers)}
                                              for group in finetune])
    return metadata


def save_lora(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a native LoRA file atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not so for {bad}")
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
    full_metadata = {**metadata, "format": FORMAT, "format_version": FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temp_path), metadata=full_metadata)
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def foreign_format_hint(keys: list[str]) -> str:
    """A sentence saying which other LoRA format the keys look like, or '' when unknown."""
    if any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in keys):
        return " It looks like a webui/kohya LoRA; convert it with hcpdiff.tools.lora_convert --from_webui."
    if any(key.startswith(("unet.", "text_encoder.")) and ".lora" in key for key in keys):
        return " It looks like a diffusers LoRA; convert it with hcpdiff.tools.lora_convert --from_diffusers."
    if any("___" in key for key in keys):
        return " It looks like an HCP-Diffusion v1 LoRA, which is not supported."
    return ""


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Read a native checkpoint into (LoRA state, fully trained tensors, metadata); errors name the file.

    Full fine-tuning groups (`unet:` / `text_encoder:`) store their tensors under the model's own parameter names
    beside the LoRA keys; the metadata's `full_params` lists them.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as opened:
            metadata = opened.metadata() or {}
            state = {key: opened.get_tensor(key) for key in opened.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"LoRA file '{path}' is not a safetensors file ({err}).") from err
    if metadata.get("format") != FORMAT:
        raise ModelError(
            f"LoRA file '{path}' is not an hcpdiff LoRA (no format={FORMAT} metadata)."
            + foreign_format_hint(list(state))
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"LoRA file '{path}' has format_version {metadata.get('format_version')!r}; "
            f"this hcpdiff reads version {FORMAT_VERSION}."
        )
    try:
        full_names = set(json.loads(metadata.get(FULL_PARAMS_KEY, "[]")))
    except json.JSONDecodeError as err:
        raise ModelError(f"LoRA file '{path}': metadata '{FULL_PARAMS_KEY}' is not a JSON list ({err}).") from err
    absent = sorted(full_names - set(state))
    if absent:
        raise ModelError(f"LoRA file '{path}' lists fully trained tensor '{absent[0]}' but does not hold it.")
    full = {key: tensor for key, tensor in state.items() if key in full_names}
    lora = {key: tensor for key, tensor in state.items() if key not in full_names}
    check_lora_state(lora, str(path))
    return lora, full, metadata


# Rank axes that must agree within one layer (suffix, dim): a LoRA's A rows and B columns, each LoHa pair likewise.
RANK_AXES = {
    "lora": ((".lora_A.weight", 0), (".lora_B.weight", 1)),
    "loha": ((".hada_w1_a", 1), (".hada_w1_b", 0), (".hada_w2_a", 1), (".hada_w2_b", 0)),
}


def _layer_problem(parts: dict[str, torch.Tensor]) -> str | None:
    """What makes one layer's native tensors unusable (dtype, non-finite values, ranks that disagree), or None."""
    for suffix, tensor in sorted(parts.items()):
        if not tensor.is_floating_point():
            return f"'{suffix[1:]}' has dtype {str(tensor.dtype).replace('torch.', '')}, not a float type"
        if not bool(torch.isfinite(tensor).all()):
            return f"'{suffix[1:]}' holds NaN or inf values"
    for suffix in (".alpha", ".rank"):
        if suffix in parts and parts[suffix].numel() != 1:
            return f"'{suffix[1:]}' has shape {tuple(parts[suffix].shape)}, not one number"
    kind = layer_kind(parts)
    axes = [(suffix, dim) for suffix, dim in RANK_AXES.get(kind, ()) if suffix in parts]
    if any(parts[suffix].dim() <= dim for suffix, dim in axes):
        return f"its {kind} weights have shapes {_shapes(parts)}, which are not matrices"
    ranks = {parts[suffix].shape[dim] for suffix, dim in axes}
    if len(ranks) > 1:
        return f"its {kind} weights disagree on the rank: {_shapes(parts)}"
    if ranks == {0} or (".rank" in parts and float(parts[".rank"]) <= 0):
        return "its rank is 0"
    return None


def _shapes(parts: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{suffix[1:]} {list(tensor.shape)}" for suffix, tensor in sorted(parts.items())
                     if suffix not in (".alpha", ".rank"))


def check_lora_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a native LoRA state that would merge into garbage or crash later: unknown keys, a layer missing a
    tensor, integer tensors, NaN / inf, ranks that disagree; the error names `source` (the file) and the layer."""
    try:
        by_layer = layer_states(state)
    except ModelError as err:
        raise ModelError(f"LoRA file '{source}': {err}") from None
    for layer, parts in by_layer.items():
        problem = _layer_problem(parts)
        if problem is not None:
            raise ModelError(f"LoRA file '{source}', layer '{layer}': {problem}.")


def same_base_model(lora_base: str, model: str) -> bool:
    """Whether a LoRA's `base_model` metadata and the model it is merged into name the same model: the same
    folder once resolved, else the same last name part (`runwayml/stable-diffusion-v1-5` and a local folder
    `models/stable-diffusion-v1-5`, `model.safetensors` and `model`), compared case-insensitively; an empty
    `base_model` (converted files) is taken as the same."""
    if not lora_base or not model:
        return True
    lora_path, model_path = Path(lora_base), Path(model)
    if lora_path.exists() and model_path.exists() and lora_path.resolve() == model_path.resolve():
        return True

    def name(text: str) -> str:
        last = Path(text.rstrip("/\\")).name
        return (Path(last).stem if Path(last).suffix in (".safetensors", ".ckpt") else last).lower()

    return name(lora_base) == name(model)


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a native LoRA file into (state, metadata); a file that also holds fully trained tensors is refused."""
    lora, full, metadata = load_checkpoint(path)
    if full:
        raise ModelError(
            f"'{path}' holds {len(full)} fully fine-tuned tensors (from unet: / text_encoder: groups) besides its "
            "LoRA weights; this reads LoRA weights only (hcpdiff.visualizer renders such checkpoints)."
        )
    return lora, metadata


def split_key(key: str) -> tuple[str, str]:
    """(`<layer>`, suffix) of a native key; a key of no known kind is a ModelError."""
    for suffix in KEY_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ModelError(
        f"LoRA key '{key}' is not a native key (<layer>.lora_A.weight, <layer>.lora_B.weight, <layer>.alpha, "
        "<layer>.hada_w1_a ..., <layer>.lokr_w1 ...)."
    )


def layer_kind(parts: dict[str, torch.Tensor]) -> str:
    """"lora", "loha" or "lokr" from one layer's native suffixes."""
    if any(suffix.startswith(".hada_") for suffix in parts):
        return "loha"
    if any(suffix.startswith(".lokr_") for suffix in parts):
        return "lokr"
    return "lora"


def layer_rank(parts: dict[str, torch.Tensor]) -> int:
    """One layer's rank from its native weights, whatever its adapter type (a LoKr keeps it in `.rank`)."""
    kind = layer_kind(parts)
    if kind == "lokr":
        return int(parts[".rank"])
    return int(parts[".hada_w1_b" if kind == "loha" else ".lora_A.weight"].shape[0])


def layer_states(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group native keys by layer: {layer: {suffix: tensor}}; every layer must hold its type's weights and alpha."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer, suffix = split_key(key)
        by_layer.setdefault(layer, {})[suffix] = tensor
    for layer, parts in by_layer.items():
        kind = layer_kind(parts)
        missing = [suffix for suffix in REQUIRED_SUFFIXES[kind] if suffix not in parts]
        if kind == "lokr":
            missing += [f".lokr_{w}" for w in ("w1", "w2") if f".lokr_{w}" not in parts and f".lokr_{w}_a" not in parts]
        if missing:
            raise ModelError(f"LoRA weights of layer '{layer}' lack {', '.join(layer + s for s in missing)}.")
    return by_layer


def load_lora_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy native weights and alphas into the adapters attach_lora put on `model`; layers must match one to one."""
    layers = lora_layers(model)
    by_layer = layer_states(state)
    unknown = [name for name in by_layer if name not in layers]
    if unknown:
        raise ModelError(
            f"LoRA weights for layer '{unknown[0]}' have no attached adapter ({len(unknown)} such layers)."
        )
    absent = [name for name in layers if name not in by_layer]
    if absent:
        raise ModelError(f"LoRA weights lack the attached layer '{absent[0]}' ({len(absent)} such layers).")
    with torch.no_grad():
        for name, parts in by_layer.items():
            layer = layers[name]
            adapter = only_adapter(layer, name)
            targets = adapter_tensors(layer, adapter)
            weights = {suffix for suffix in parts if suffix not in (".alpha", ".rank")}
            if weights != set(targets):
                raise ModelError(
                    f"LoRA weights of layer '{name}' are {sorted(weights)}; the attached {adapter_kind(layer)} "
                    f"adapter has {sorted(targets)} (a different adapter type or rank?)."
                )
            for suffix, target in targets.items():
                if parts[suffix].shape != target.shape:
                    raise ModelError(
                        f"LoRA weight '{name}{suffix}' has shape {tuple(parts[suffix].shape)}, "
                        f"the attached adapter expects {tuple(target.shape)}."
                    )
                target.copy_(parts[suffix])
            alpha = float(parts[".alpha"])
            (layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha)[adapter] = alpha
            layer.scaling[adapter] = alpha / layer.r[adapter]  # peft's scale (no rslora here)
