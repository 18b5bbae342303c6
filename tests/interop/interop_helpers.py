"""Helpers of the interop tests: LoRA files in each adapter type for the tiny SD1.x and SDXL models with hcpdiff's own
merge of them, local checkouts of other tools, and stand-ins for their heavy imports. A module of its own name, not
conftest, so `from interop_helpers import ...` cannot pick up another folder's conftest."""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from hcpdiff.lora import LoraGroupSpec, attach_lora, lora_metadata, lora_state_dict, merge_lora, save_lora

KINDS = {"lora": {}, "loha": {"type": "loha"}, "lokr": {"type": "lokr"}, "dora": {"dora": True}}
PART_FOLDERS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


@dataclass
class Case:
    """One family x adapter type: native files, the --to_webui file, base and hcpdiff-merged weights by part."""

    family: str
    kind: str
    model_dir: Path
    native: dict[str, Path]
    webui: dict[str, torch.Tensor]
    webui_path: Path
    base: dict[str, nn.Module] = field(default_factory=dict)  # plain models
    merged: dict[str, nn.Module] = field(default_factory=dict)  # plain models with hcpdiff's merge_lora applied

    def layers(self, part: str) -> list[str]:
        """The layers the native file of `part` adapts."""
        from hcpdiff.lora import load_lora
        from hcpdiff.lora.state_io import layer_states

        return list(layer_states(load_lora(self.native[part])[0]))


def load_part(model_dir: Path, part: str) -> nn.Module:
    """A fresh plain U-Net or text encoder from a tiny model folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if part == "unet":
        return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    return cls.from_pretrained(model_dir, subfolder=part)


def build_case(family: str, kind: str, model_dir: Path, folder: Path) -> Case:
    """Every Linear / Conv2d of every part gets one adapter of `kind` (rank 4, alpha 2) with random trained-looking
    weights; LoRA on the convolutions is LoCon."""
    from hcpdiff.lora.webui_format import SDXL_WEBUI_PREFIX, WEBUI_PREFIX, native_to_webui
    from hcpdiff.tools.lora_convert import main, meta_models, unet_ldm_renames

    parts = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    native, base, merged = {}, {}, {}
    generator = torch.Generator().manual_seed(len(family) * 10 + len(kind))
    for part in parts:
        model = load_part(model_dir, part)
        groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=[""], rank=4, alpha=2.0, **KINDS[kind])], part,
                             f"lora_{part}")
        with torch.no_grad():
            for param in groups[0].params:  # DoRA magnitudes near 1, the rest small and nonzero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
        native[part] = folder / f"{part}-1.safetensors"
        save_lora(native[part], lora_state_dict(model), lora_metadata(part, str(model_dir), groups, 1))
        base[part] = load_part(model_dir, part)
        merged[part] = load_part(model_dir, part)
        from hcpdiff.lora import load_lora

        merge_lora(merged[part], load_lora(native[part])[0])
    webui_path = folder / "webui.safetensors"
    if kind == "dora":  # --to_webui refuses DoRA; the key mapping is the same, so the tools are shown its tensors
        from safetensors.torch import save_file

        from hcpdiff.lora import load_lora

        prefixes = SDXL_WEBUI_PREFIX if family == "sdxl" else WEBUI_PREFIX
        renames = unet_ldm_renames(meta_models(str(model_dir))) if family == "sdxl" else None
        webui = {}
        for part in parts:
            webui.update(native_to_webui(load_lora(native[part])[0], part, prefixes, renames if part == "unet" else None))
        save_file({k: v.contiguous() for k, v in webui.items()}, str(webui_path))
    else:
        args = ["--to_webui", "--dump_path", str(webui_path), "--lora_path", str(native["unet"]),
                "--lora_path_TE", str(native["text_encoder"])]
        if family == "sdxl":
            args += ["--sdxl", "--lora_path_TE2", str(native["text_encoder_2"])]
        assert main(args) == 0
    from safetensors.torch import load_file

    return Case(family, kind, model_dir, native, load_file(str(webui_path)), webui_path, base, merged)


def checkout(variable: str, marker: str) -> Path:
    """The local checkout named by an environment variable, or a skip that says which variable to set."""
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: point it at a local checkout (holding {marker}) to run this loader's code")
    path = Path(value)
    if not (path / marker).is_file():
        pytest.skip(f"{variable}={value} holds no {marker}")
    return path


def stub_modules(names: dict[str, dict]) -> dict[str, object]:
    """Put stand-in modules (for a loader's heavy imports) into sys.modules; returns what was there before."""
    import types

    before = {}
    for name, attributes in names.items():
        before[name] = sys.modules.get(name)
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    return before


def restore_modules(before: dict[str, object]) -> None:
    """Undo stub_modules."""
    for name, module in before.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def comfy_model_class(name: str) -> type:
    """A fresh stand-in for ComfyUI's model class `name` (module attributes such as `__file__` stay missing): the key
    map asks `isinstance(model, model_base.<class>)` of more classes with every ComfyUI release."""
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


@contextmanager
def comfy_imported(root: Path) -> Iterator[Any]:
    """The `comfy` package of the ComfyUI checkout at `root`, importable while the block runs; model_management (its
    device cast) and model_base (any model class, none of which the stand-in models are) stand in for ComfyUI's heavy
    modules. Afterwards every comfy module is gone from sys.modules again."""
    stand_ins = {"comfy.model_management": {"cast_to_device": lambda tensor, device, dtype, copy=False:
                                            tensor.to(device=device, dtype=dtype, copy=copy)},
                 "comfy.model_base": {"__getattr__": comfy_model_class}}
    before = stub_modules(stand_ins)
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("comfy")
        for name in stand_ins:  # a module put into sys.modules is not an attribute of its package by itself
            setattr(package, name.split(".")[1], sys.modules[name])
        yield package
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == "comfy" and n not in stand_ins]:
            sys.modules.pop(name)
        restore_modules(before)


def layer_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """A layer's weight, as float32."""
    return model.get_submodule(layer).weight.detach().to(torch.float32)
