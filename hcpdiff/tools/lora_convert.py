"""Convert LoRA files: hcpdiff native <-> webui (kohya / a1111, ComfyUI, Forge) and native -> diffusers.

The family comes from a native file's metadata (a kohya file's from its names): FLUX.1 files use kohya's FLUX names
in BFL's original layout, SD3 / SD3.5 files kohya's SD3 names in the original MMDiT layout (q / k / v fused exactly
in both), SD and SDXL ones kohya's SD names (SDXL's told by the metadata, a second CLIP or the base model
folder; `--sdxl` for files that tell none of these).

Alpha: hcpdiff, kohya and the webui all scale a layer by alpha / rank, so alpha is copied as is and the
converted file has exactly the native effect. `--auto_scale_alpha` is kept for HCP-Diffusion v1 commands
(whose alpha was the scale itself and had to be multiplied by rank); on hcpdiff files it changes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hcpdiff.cli import run_cli
from hcpdiff.errors import ModelError
from hcpdiff.families import FAMILIES, TRAINABLE_PARTS, Family, family_named
from hcpdiff.lora.ldm_names import SDXL_UNET_CONFIG, ldm_unet_names
from hcpdiff.lora.state_io import (FORMAT, FORMAT_VERSION, check_lora_state, layer_kind, layer_rank, layer_states,
                                   load_lora, save_lora)
from hcpdiff.lora.lycoris_format import webui_tensors
from hcpdiff.lora.webui_format import (DIFFUSERS_PREFIX, SDXL_WEBUI_PREFIX, WEBUI_PREFIX, is_sdxl_webui_state,
                                       is_webui_state, native_to_diffusers, native_to_webui, webui_to_native)

NativeParts = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]  # part -> (native state, metadata)
# a denoising expert's LoRA (Wan2.2 A14B's): which expert, and its diffusers folder; carried into every format
EXPERT_KEYS = ("expert", "expert_folder")


def expert_metadata(parts: NativeParts) -> dict[str, str]:
    """The expert keys of the files' metadata (a denoising expert's LoRA), empty for another LoRA."""
    return {key: meta[key] for _, meta in parts.values() for key in EXPERT_KEYS if meta.get(key)}


def expert_note(parts: NativeParts, expert: dict[str, str]) -> None:
    """Tell where a denoising expert's LoRA loads: that expert's own model (ComfyUI), its folder's part (diffusers)."""
    if not expert:
        return
    folder = expert.get("expert_folder", "")
    part = next((part for part, (_, meta) in parts.items() if meta.get("expert")), folder)
    how = "load_lora_weights loads it there" if folder == part else f"load_lora_weights(..., load_into_{folder}=True)"
    print(f"note: a LoRA of the {expert['expert']} expert ({folder}): load it into that expert's model (diffusers: "
          f"{how})", file=sys.stderr)


def denoiser_parts() -> tuple[str, ...]:
    """Every family's denoiser part (unet, transformer): what `--lora_path` takes."""
    return tuple(dict.fromkeys(family.denoiser for family in FAMILIES))


def own_layout_family(metadata: dict[str, str]) -> Family | None:
    """The family a native file's metadata names, when that family converts its kohya files itself (FLUX)."""
    family = family_named(metadata["family"]) if metadata.get("family") else None
    return family if family is not None and family.has_webui_layout else None


def files_family(parts: NativeParts) -> Family | None:
    """The one family the given native files name in their metadata (None: none names one); two is an error."""
    names = {metadata["family"] for _, metadata in parts.values() if metadata.get("family")}
    if len(names) > 1:
        raise ModelError(f"the LoRA files are of different model families ({', '.join(sorted(names))}); convert "
                         "each family's files on their own.")
    return family_named(names.pop()) if names else None


def base_model_is_sdxl(base_model: str) -> bool:
    """Whether a native file's `base_model` is a local SDXL folder (its U-Net takes text_time conditioning)."""
    config = Path(base_model) / "unet" / "config.json" if base_model else None
    if config is None or not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any safetensors file as (tensors, metadata); a missing or unreadable file is a ModelError."""
    if not Path(path).is_file():
        raise ModelError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(path, framework="pt", device="cpu") as opened:
            return {key: opened.get_tensor(key) for key in opened.keys()}, opened.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"LoRA file '{path}' is not a safetensors file ({err}).") from err


def native_parts(
    lora_path: str | None, lora_path_te: str | None, lora_path_te2: str | None = None,
    lora_path_te3: str | None = None,
) -> NativeParts:
    """The native (state, metadata) given on the command line, by part (any subset, at least one); a file of another
    part is an error."""
    if not lora_path and not lora_path_te and not lora_path_te2 and not lora_path_te3:
        raise ModelError("give at least one native LoRA: --lora_path (U-Net or transformer), --lora_path_TE (text "
                         "encoder), --lora_path_TE2 (SDXL's second text encoder, FLUX's T5, SD3's CLIP-G), "
                         "--lora_path_TE3 (SD3's T5).")
    parts = {}
    for part, path, flag in (("unet", lora_path, "--lora_path"), ("text_encoder", lora_path_te, "--lora_path_TE"),
                             ("text_encoder_2", lora_path_te2, "--lora_path_TE2"),
                             ("text_encoder_3", lora_path_te3, "--lora_path_TE3")):
        if path:
            state, metadata = load_lora(path)
            if flag == "--lora_path" and metadata.get("part") in denoiser_parts():
                part = metadata["part"]  # the denoiser of the file's family: a U-Net, or FLUX's transformer
            if metadata.get("part", part) != part:
                raise ModelError(f"{flag} '{path}' is a {metadata['part']} LoRA; {flag} takes the {part} one.")
            check_layers_exist(state, path, part, metadata.get("base_model", ""))
            parts[part] = (state, metadata)
    return parts


def files_are_sdxl(parts: NativeParts) -> bool:
    """Whether SD-layout native files are SDXL's (their kohya names differ from SD1/2's): the metadata's family says
    so, or there is a second CLIP of no other family, or the base model named in the metadata is a local SDXL folder.
    Files that tell none of these (HCP-Diffusion v1's) read as SD1/2 unless `--sdxl` is given."""
    for part, (_, metadata) in parts.items():
        family = metadata.get("family")
        if family == "sdxl" or (family is None and (part == "text_encoder_2"
                                                    or base_model_is_sdxl(metadata.get("base_model", "")))):
            return True
    return False


def is_model_folder(path: str | None) -> bool:
    """Whether `path` is a local diffusers model folder (a native base_model may be a hub id or a folder since gone)."""
    return bool(path) and (Path(path) / "unet" / "config.json").is_file()


def check_layers_exist(state: dict[str, torch.Tensor], path: str, part: str, base_model: str) -> None:
    """Every layer of a native file must be a module of its base model when the metadata names a local model
    folder; a converted file with names no loader knows would load as nothing. (Without a local folder the layout
    is unknown: SD1.x, SD2.x, tiny and custom U-Nets name their blocks differently.)"""
    if not is_model_folder(base_model):
        return
    names = set(module_names(meta_models(base_model)).get(part, []))
    unknown = sorted(layer for layer in layer_states(state) if layer not in names)
    if unknown:
        raise ModelError(f"LoRA file '{path}', layer '{unknown[0]}': no such {part} layer in its base model "
                         f"'{base_model}' ({len(unknown)} such layers).")


def meta_models(model_path: str | None, sdxl: bool = False) -> dict[str, torch.nn.Module]:
    """U-Net and text encoder(s) built on the meta device (no weights): the model folder's, else SD1.x/2.x's layout,
    or with `sdxl` SDXL base 1.0's."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if model_path is None:
        unet_config: dict = dict(SDXL_UNET_CONFIG) if sdxl else {}  # UNet2DConditionModel's defaults: SD1.5's layout
        text_config = CLIPTextConfig(num_hidden_layers=24)  # covers CLIP-L (12) and OpenCLIP-H (23) layer names
    else:
        if not (Path(model_path) / "unet").is_dir():
            raise ModelError(f"--model '{model_path}' is not a diffusers model folder (no unet/ inside).")
        unet_config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        text_config = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder")
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(unet_config), "text_encoder": CLIPTextModel(text_config)}
        if model_path is not None and (Path(model_path) / "text_encoder_2").is_dir():
            text_config_2 = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(text_config_2)
        elif model_path is None and sdxl:  # OpenCLIP bigG has 32 layers
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=32))
    return models


def module_names(models: dict[str, torch.nn.Module]) -> dict[str, list[str]]:
    """{part: its module names}."""
    return {part: [n for n, _ in model.named_modules() if n] for part, model in models.items()}


def unet_ldm_renames(models: dict[str, torch.nn.Module]) -> dict[str, str]:
    """{U-Net layer: its original-layout (ldm) name}, numbered from the given U-Net's own blocks."""
    unet = models["unet"]
    return ldm_unet_names(unet, [n for n, _ in unet.named_modules() if n])


def attention_projections(state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """{encoder layer: the self_attn projections (q, k, v, out) a text-encoder LoRA adapts in it}."""
    found: dict[str, set[str]] = {}
    for key in state:
        if m := re.search(r"^(.*)\.self_attn\.(q|k|v|out)_proj\.", key):
            found.setdefault(m.group(1), set()).add(m.group(2))
    return found


def dropped_attention_note(part: str, state: dict[str, torch.Tensor], sdxl: bool, v2: bool) -> str | None:
    """A `note:` naming the tools that leave a text-encoder LoRA's self_attn layers out, or None when none does.

    diffusers (0.3x-0.4x) guesses each text encoder's key format from a `self_attn.out_proj` key; without one the
    q/k/v tensors are reported UNEXPECTED and left out. A1111 runs OpenCLIP (SDXL's second encoder, SD2's encoder)
    as torch MultiheadAttention, q, k and v in one weight: it merges an attention layer's LoRA only when q, k, v and
    out all have one and skips it silently otherwise (networks.network_apply_weights); its CLIP-L takes each
    projection alone. ComfyUI maps every projection on its own.
    """
    layers = attention_projections(state)
    diffusers_drops = bool(layers) and not any("out" in found for found in layers.values())
    open_clip = (sdxl and part == "text_encoder_2") or (v2 and part == "text_encoder")
    a1111_drops = open_clip and any(found != {"q", "k", "v", "out"} for found in layers.values())
    if not diffusers_drops and not a1111_drops:
        return None
    tools = [tool for tool, drops in (("diffusers' load_lora_weights", diffusers_drops), ("A1111", a1111_drops))
             if drops]
    why = []
    if diffusers_drops:
        why.append("diffusers reads an encoder's keys only when some self_attn.out_proj has a LoRA (give diffusers "
                   "a --to_diffusers file)")
    if a1111_drops:
        why.append("A1111 merges an OpenCLIP attention layer only when its q, k, v and out_proj all have a LoRA")
    loads = "ComfyUI loads them" + ("" if a1111_drops else ", and so does A1111")
    return (f"note: {' and '.join(tools)} leave out the {part} LoRA's self_attn layers: {'; '.join(why)}. {loads}. "
            "Training all of self_attn (the guide's 're:.*self_attn$') reaches every tool.")


def is_sd2(base_model: str | None, states: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether an SD (not SDXL) LoRA is for SD2.x: from its base model's cross-attention width, else from its
    weights' (SD2's OpenCLIP-H is 1024 wide, SD1's CLIP-L 768)."""
    if is_model_folder(base_model):
        config = json.loads((Path(base_model) / "unet" / "config.json").read_text(encoding="utf-8"))
        return config.get("cross_attention_dim") == 1024
    widths = [tensor.shape[-1] for key, tensor in states.get("unet", {}).items()
              if re.search(r"attn2\.to_[kv]\.lora_A\.weight$", key)]
    widths += [tensor.shape[-1] for key, tensor in states.get("text_encoder", {}).items()
               if re.search(r"self_attn\.q_proj\.lora_A\.weight$", key)]
    return bool(widths) and widths[0] == 1024


def refuse_dora(part: str, state: dict[str, torch.Tensor]) -> None:
    """A DoRA layer is an error: no webui file of it renders right in both ComfyUI and A1111 (README, DoRA)."""
    dora = [key.removesuffix(".lora_magnitude_vector.weight") for key in state
            if key.endswith(".lora_magnitude_vector.weight")]
    if dora:
        raise ModelError(
            f"{part} layer '{dora[0]}' is DoRA ({len(dora)} such layers), which no webui file carries right: ComfyUI "
            "divides a per-output-row dora_scale by the base weight's norm (peft and hcpdiff by the adapted weight's), "
            "and A1111 reads dora_scale only per input column; render it with hcpdiff.visualizer, or train without "
            "dora.")


def sd_kohya_version(sdxl: bool, v2: bool) -> dict[str, str]:
    """kohya's version metadata of an SD1.x / SD2.x / SDXL LoRA (see Family.kohya_version)."""
    return {"ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2),
            "architecture": "stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v2" if v2
            else "stable-diffusion-v1", "network_module": "networks.lora"}


def kohya_metadata(states: dict[str, dict[str, torch.Tensor]], version: dict[str, str]) -> dict[str, str]:
    """The `ss_*` metadata kohya's train_network writes and the UIs read: A1111 files a LoRA under SD1 / SD2 / SDXL by
    `ss_base_model_version` and `ss_v2` (NetworkOnDisk.detect_version) and hides those of another model family.
    `states` are native states by part (for a fused layout, the fused layers' tensors), `version` the family's."""
    layers = [parts for state in states.values() for parts in layer_states(state).values()]
    ranks = sorted({layer_rank(parts) for parts in layers})
    alphas = sorted({float(parts[".alpha"]) for parts in layers})
    kinds = sorted({layer_kind(parts) for parts in layers})
    lycoris = kinds != ["lora"]
    denoisers = set(denoiser_parts())
    return {
        "ss_network_module": "lycoris.kohya" if lycoris else version["network_module"],
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",  # kohya's resize_lora writes Dynamic too
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic",
        "ss_network_args": json.dumps({"algo": kinds[0] if len(kinds) == 1 else "mixed"} if lycoris else {}),
        "ss_base_model_version": version["ss_base_model_version"],
        "ss_v2": version["ss_v2"],
        "ss_network_train_unet_only": str(set(states) <= denoisers),
        "ss_network_train_text_encoder_only": str(not set(states) & denoisers),
        "modelspec.architecture": f"{version['architecture']}/{'lycoris' if lycoris else 'lora'}",
        "ss_training_comment": "converted from hcpdiff native LoRA files by hcpdiff.tools.lora_convert --to_webui",
    }


def refuse_unwritable_webui_parts(parts: NativeParts, prefixes: dict[str, str]) -> None:
    """One error for a part whose kohya / webui names the SD path does not write (a transformer file whose metadata
    names no family), or whose family names it with another prefix than it would write; nothing is silently
    dropped."""
    for part, (_, metadata) in parts.items():
        family = family_named(metadata["family"]) if metadata.get("family") else None
        wanted = family.webui_prefixes.get(part) if family is not None else prefixes.get(part)
        if part not in prefixes or wanted != prefixes[part]:
            shown = family.description if family is not None else part
            raise ModelError(f"--to_webui: a {shown} {part} LoRA has no webui / kohya layout in hcpdiff (a file "
                             "without a `family` in its metadata cannot tell which); convert it with --to_diffusers")


def to_webui_of_family(args: argparse.Namespace, family: Family, parts: NativeParts) -> None:
    """Write one kohya file in a family's own layout (FLUX: BFL's), with the metadata kohya writes for it."""
    if args.sdxl:
        raise ModelError(f"--sdxl: the LoRA files are {family.description} ones (their metadata says so); "
                         "leave --sdxl out.")
    states = {part: state for part, (state, _) in parts.items()}
    for part, state in states.items():
        refuse_dora(part, state)
    by_part = family.native_to_webui(states)
    webui = {layer + suffix: tensor for layers in by_part.values() for layer, native in layers.items()
             for suffix, tensor in webui_tensors(native).items()}
    written = {part: {layer + suffix: tensor for layer, native in layers.items() for suffix, tensor in native.items()}
               for part, layers in by_part.items()}  # fused layers as kohya will read them
    base_model = args.model or next((meta["base_model"] for _, meta in parts.values() if meta.get("base_model")), None)
    for note in family.webui_notes(states):
        print(f"note: {note}", file=sys.stderr)
    expert = expert_metadata(parts)
    expert_note(parts, expert)
    save_file({k: v.contiguous() for k, v in webui.items()}, args.dump_path,
              metadata={**kohya_metadata(written, family.kohya_version(base_model)), **expert})
    print(f"wrote {len(webui)} tensors to {args.dump_path}")


def to_webui(args: argparse.Namespace) -> None:
    """Write one webui file holding the U-Net and text-encoder LoRAs given, with the metadata kohya writes."""
    webui: dict[str, torch.Tensor] = {}
    parts = native_parts(args.lora_path, args.lora_path_TE, args.lora_path_TE2, args.lora_path_TE3)
    if (family := files_family(parts)) is not None and family.has_webui_layout:
        to_webui_of_family(args, family, parts)
        return
    args.sdxl = args.sdxl or files_are_sdxl(parts)
    prefixes = SDXL_WEBUI_PREFIX if args.sdxl else WEBUI_PREFIX
    refuse_unwritable_webui_parts(parts, prefixes)
    states = {part: state for part, (state, _) in parts.items()}
    base_model = args.model or next(
        (meta["base_model"] for _, meta in parts.values() if is_model_folder(meta.get("base_model"))), None)
    v2 = not args.sdxl and is_sd2(base_model, states)
    for part, state in states.items():
        refuse_dora(part, state)
        # SDXL U-Net layers by their original-layout names: kohya's own SDXL files use them, A1111 reads only them
        # whole (its diffusers-name formula assumes SD1's blocks), ComfyUI and diffusers read both
        renames = unet_ldm_renames(meta_models(base_model, sdxl=True)) if args.sdxl and part == "unet" else None
        webui.update(native_to_webui(state, part, prefixes, renames))
        if part != "unet" and (note := dropped_attention_note(part, state, args.sdxl, v2)):
            print(note, file=sys.stderr)
    save_file({k: v.contiguous() for k, v in webui.items()}, args.dump_path,
              metadata=kohya_metadata(states, sd_kohya_version(args.sdxl, v2)))
    print(f"wrote {len(webui)} tensors to {args.dump_path}")


def to_diffusers(args: argparse.Namespace) -> None:
    """Write a `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights` (alpha folded into B)."""
    out: dict[str, torch.Tensor] = {}
    parts = native_parts(args.lora_path, args.lora_path_TE, args.lora_path_TE2, args.lora_path_TE3)
    for part, (state, _) in parts.items():
        if part not in DIFFUSERS_PREFIX:  # SD3's T5: StableDiffusion3Pipeline loads LoRAs of the two CLIPs only
            raise ModelError(f"--to_diffusers: diffusers' load_lora_weights loads no {part} LoRA; convert it with "
                             "--to_webui (ComfyUI reads its lora_te3_ names) or render it with hcpdiff.visualizer.")
        out.update(native_to_diffusers(state, part))
    expert = expert_metadata(parts)
    expert_note(parts, expert)
    save_file({k: v.contiguous() for k, v in out.items()}, args.dump_path, metadata={"format": "pt", **expert})
    print(f"wrote {len(out)} tensors to {args.dump_path}")


def from_webui(args: argparse.Namespace) -> None:
    """Write `<dump_path>/<part>-<name>.safetensors` (unet or transformer, text_encoder, ...) as native files."""
    if not args.lora_path:
        raise ModelError("--from_webui: give --lora_path, the webui / kohya file to convert.")
    state, metadata = read_safetensors(args.lora_path)
    if metadata.get("format") != FORMAT and (family := webui_file_family(state, metadata)) is not None:
        if args.sdxl:
            raise ModelError(f"--from_webui: '{args.lora_path}' is a {family.description} LoRA; leave --sdxl out.")
        write_native_files(family.webui_to_native(state, args.model), args, family.name,
                           {key: metadata[key] for key in EXPERT_KEYS if metadata.get(key)})
        return
    if metadata.get("format") == FORMAT or not is_webui_state(state):
        raise ModelError(f"--from_webui: '{args.lora_path}' is not a webui LoRA (keys lora_unet_... / lora_te_...).")
    args.sdxl = args.sdxl or is_sdxl_webui_state(state)  # kohya's SDXL files name two CLIPs lora_te1_ / lora_te2_
    if args.sdxl and args.model is None:
        raise ModelError(f"--from_webui: '{args.lora_path}' is an SDXL LoRA; give --model, the SDXL base model folder "
                         "whose module names decode its keys.")
    models = meta_models(args.model)
    # U-Net layers are read by their diffusers-style and their original-layout names, as ComfyUI reads them
    states = webui_to_native(state, module_names(models), SDXL_WEBUI_PREFIX if args.sdxl else WEBUI_PREFIX,
                             {"unet": unet_ldm_renames(models)})
    write_native_files(states, args)


def webui_file_family(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Family | None:
    """The family of a kohya file among those that read their own layout (FLUX), by its names and metadata."""
    return next((family for family in FAMILIES
                 if family.has_webui_layout and family.is_webui_file(list(state), metadata)), None)


def write_native_files(states: dict[str, dict[str, torch.Tensor]], args: argparse.Namespace,
                       family: str | None = None, expert: dict[str, str] | None = None) -> None:
    """Write each part's native state as `<dump_path>/<part>-<name of the webui file>.safetensors` (with a denoising
    expert's keys on the denoiser's file)."""
    out_dir = Path(args.dump_path)
    for part, part_state in states.items():
        path = out_dir / f"{part}-{Path(args.lora_path).stem}.safetensors"
        check_lora_state(part_state, args.lora_path)  # what it would write must be readable back
        layers = layer_states(part_state).values()
        ranks = sorted({layer_rank(parts) for parts in layers})
        kinds = sorted({layer_kind(parts) for parts in layers})
        groups = [{"name": "webui", "type": kinds[0] if len(kinds) == 1 else kinds,
                   "rank": ranks[0] if len(ranks) == 1 else ranks, "source": args.lora_path}]
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "part": part, "step": "0",
                "base_model": args.model or "", "groups": json.dumps(groups)}
        if family is not None:  # --to_webui reads the family back from it
            info["family"] = family
            if expert and part == family_named(family).denoiser:
                info.update(expert)
        save_lora(path, part_state, info)
        print(f"wrote {path}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved (relative paths, symlinks), or hard links of it."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: not the same file
        return False


def refuse_overwriting_sources(args: argparse.Namespace) -> None:
    """An output that is one of the input files would destroy it (a native file's metadata, a webui original)."""
    sources = {flag: Path(path) for flag, path in (("--lora_path", args.lora_path), ("--lora_path_TE", args.lora_path_TE),
                                                   ("--lora_path_TE2", args.lora_path_TE2),
                                                   ("--lora_path_TE3", args.lora_path_TE3)) if path}
    if args.from_webui and args.lora_path:  # the folder's files, named as from_webui names them
        outputs = [Path(args.dump_path) / f"{part}-{Path(args.lora_path).stem}.safetensors"
                   for part in TRAINABLE_PARTS]
        outputs.append(Path(args.dump_path))
    else:
        outputs = [Path(args.dump_path)]
    for output in outputs:
        for flag, source in sources.items():
            if _same_file(output, source):
                raise ModelError(f"--dump_path '{args.dump_path}' would overwrite the input {flag} '{source}'; "
                                 "write the converted file elsewhere.")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m hcpdiff.tools.lora_convert`."""
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.lora_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to_webui", action="store_true", help="native -> one webui/kohya file")
    mode.add_argument("--from_webui", action="store_true", help="webui/kohya file -> native files in --dump_path/")
    mode.add_argument("--to_diffusers", action="store_true", help="native -> pytorch_lora_weights.safetensors")
    parser.add_argument("--lora_path", default=None,
                        help="the denoiser's LoRA (native: U-Net, or FLUX's / SD3's transformer), if any; with "
                             "--from_webui the webui file (required)")
    parser.add_argument("--lora_path_TE", default=None, help="text-encoder LoRA (native), if any")
    parser.add_argument("--lora_path_TE2", default=None,
                        help="second text-encoder LoRA (native: SDXL's OpenCLIP, FLUX's T5, SD3's CLIP-G), if any")
    parser.add_argument("--lora_path_TE3", default=None, help="third text-encoder LoRA (native: SD3's T5), if any")
    parser.add_argument("--sdxl", action="store_true",
                        help="read SD-layout files as SDXL when nothing in them tells (HCP-Diffusion v1 files): kohya's "
                             "SDXL names (lora_unet_ + original-layout U-Net names, lora_te1_, lora_te2_). hcpdiff's "
                             "files say their family, and SDXL kohya files are told by their keys; --from_webui of "
                             "an SDXL file needs --model")
    parser.add_argument("--dump_path", required=True, help="output file (a folder with --from_webui)")
    parser.add_argument("--model", default=None,
                        help="base model folder whose module names decode (--from_webui; for FLUX, its text "
                             "encoders') or number (--to_webui --sdxl) the layers; default: the native file's "
                             "base_model folder, else SD1.x/2.x's (SDXL's, FLUX.1's) layout")
    parser.add_argument("--auto_scale_alpha", action="store_true",
                        help="accepted for HCP-Diffusion v1 commands; hcpdiff alpha already means scale = alpha / rank "
                             "as in the webui, so alpha is copied unchanged and the effect stays exact")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def main(argv: list[str]) -> int:
    """Parse the command line and convert."""
    args = build_parser().parse_args(argv)
    if args.auto_scale_alpha:
        print("note: --auto_scale_alpha: hcpdiff alphas already use the webui's alpha / rank scale; copied unchanged.")
    refuse_overwriting_sources(args)
    if args.from_webui:
        from_webui(args)
    elif args.to_webui:
        to_webui(args)
    else:
        to_diffusers(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
