"""Convert LoRA files: hcpdiff native <-> webui (kohya / a1111, ComfyUI) and native -> diffusers.

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
from hcpdiff.lora.state_io import (FORMAT, FORMAT_VERSION, check_lora_state, layer_kind, layer_rank, layer_states,
                                   load_lora, save_lora)
from hcpdiff.lora.webui_format import (SDXL_WEBUI_PREFIX, WEBUI_PREFIX, is_sdxl_webui_state, is_webui_state,
                                       native_to_diffusers, native_to_webui, webui_to_native)

PARTS = ("unet", "text_encoder", "text_encoder_2")


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
    lora_path: str | None, lora_path_te: str | None, lora_path_te2: str | None = None, sdxl: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """The native states given on the command line, by part; a file of another part, or an SDXL file without
    `sdxl` (its webui names differ), is an error."""
    if not lora_path and not lora_path_te and not lora_path_te2:
        raise ModelError("give --lora_path (U-Net LoRA) and/or --lora_path_TE (text-encoder LoRA).")
    states = {}
    for part, path, flag in (("unet", lora_path, "--lora_path"), ("text_encoder", lora_path_te, "--lora_path_TE"),
                             ("text_encoder_2", lora_path_te2, "--lora_path_TE2")):
        if path:
            state, metadata = load_lora(path)
            if metadata.get("part", part) != part:
                raise ModelError(f"{flag} '{path}' is a {metadata['part']} LoRA; {flag} takes the {part} one.")
            if not sdxl and (part == "text_encoder_2" or base_model_is_sdxl(metadata.get("base_model", ""))):
                raise ModelError(f"{flag} '{path}' is an SDXL LoRA; add --sdxl (kohya's SDXL names: lora_te1_ / lora_te2_).")
            check_layers_exist(state, path, part, metadata.get("base_model", ""))
            states[part] = state
    return states


def check_layers_exist(state: dict[str, torch.Tensor], path: str, part: str, base_model: str) -> None:
    """Every layer of a native file must be a module of its base model when the metadata names a local model
    folder; a converted file with names no loader knows would load as nothing. (Without a local folder the layout
    is unknown: SD1.x, SD2.x, tiny and custom U-Nets name their blocks differently.)"""
    if not base_model or not (Path(base_model) / "unet").is_dir():
        return
    names = set(meta_module_names(base_model).get(part, []))
    unknown = sorted(layer for layer in layer_states(state) if layer not in names)
    if unknown:
        raise ModelError(f"LoRA file '{path}', layer '{unknown[0]}': no such {part} layer in its base model "
                         f"'{base_model}' ({len(unknown)} such layers).")


def meta_module_names(model_path: str | None) -> dict[str, list[str]]:
    """Module names of the U-Net and text encoder(s), built on the meta device (no weights): the model's or SD1.x/2.x layout."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if model_path is None:
        unet_config: dict = {}  # UNet2DConditionModel defaults are the SD1.5 layout
        text_config = CLIPTextConfig(num_hidden_layers=24)  # covers CLIP-L (12) and OpenCLIP-H (23) layer names
    else:
        if not (Path(model_path) / "unet").is_dir():
            raise ModelError(f"--model '{model_path}' is not a diffusers model folder (no unet/ inside).")
        unet_config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
        text_config = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoders = {"text_encoder": CLIPTextModel(text_config)}
        if model_path is not None and (Path(model_path) / "text_encoder_2").is_dir():
            text_config_2 = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder_2")
            text_encoders["text_encoder_2"] = CLIPTextModelWithProjection(text_config_2)
    models = {"unet": unet, **text_encoders}
    return {part: [n for n, _ in model.named_modules() if n] for part, model in models.items()}


def diffusers_drops_attention(state: dict[str, torch.Tensor]) -> bool:
    """Whether diffusers' kohya loader would drop this text-encoder LoRA's attention layers.

    diffusers (0.3x-0.4x) turns webui `self_attn` q/k/v keys into its old `to_q_lora` names and then guesses the
    format of each text encoder's keys from an `out_proj` one (`to_out_lora`); without it the q/k/v tensors are
    reported UNEXPECTED and left out. a1111 and ComfyUI load such a file whole.
    """
    attention = {m.group(1) for key in state if (m := re.search(r"self_attn\.(q|k|v|out)_proj\.", key))}
    return bool(attention) and "out" not in attention


def to_webui(args: argparse.Namespace) -> None:
    """Write one webui file holding the U-Net and text-encoder LoRAs."""
    webui: dict[str, torch.Tensor] = {}
    prefixes = SDXL_WEBUI_PREFIX if args.sdxl else WEBUI_PREFIX
    for part, state in native_parts(args.lora_path, args.lora_path_TE, args.lora_path_TE2, args.sdxl).items():
        webui.update(native_to_webui(state, part, prefixes))
        if part != "unet" and diffusers_drops_attention(state):
            print(f"note: the {part} LoRA has self_attn q/k/v layers but no self_attn.out_proj; diffusers' "
                  "load_lora_weights drops those from a webui file (a1111 and ComfyUI load them): give diffusers "
                  "a --to_diffusers file, or train out_proj too (the guide's 're:.*self_attn$').", file=sys.stderr)
    lycoris = any(key.endswith((".dora_scale", ".lokr_w1", ".lokr_w1_a")) or ".hada_" in key for key in webui)
    module = "lycoris.kohya" if lycoris else "networks.lora"  # kohya's record of the network type
    save_file({k: v.contiguous() for k, v in webui.items()}, args.dump_path, metadata={"ss_network_module": module})
    print(f"wrote {len(webui)} tensors to {args.dump_path}")


def to_diffusers(args: argparse.Namespace) -> None:
    """Write a `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights` (alpha folded into B)."""
    out: dict[str, torch.Tensor] = {}
    for part, state in native_parts(args.lora_path, args.lora_path_TE, args.lora_path_TE2, True).items():
        out.update(native_to_diffusers(state, part))
    save_file({k: v.contiguous() for k, v in out.items()}, args.dump_path, metadata={"format": "pt"})
    print(f"wrote {len(out)} tensors to {args.dump_path}")


def from_webui(args: argparse.Namespace) -> None:
    """Write `<dump_path>/unet-<name>.safetensors` (and `text_encoder-<name>...`) as native files."""
    state, metadata = read_safetensors(args.lora_path)
    if metadata.get("format") == FORMAT or not is_webui_state(state):
        raise ModelError(f"--from_webui: '{args.lora_path}' is not a webui LoRA (keys lora_unet_... / lora_te_...).")
    if is_sdxl_webui_state(state) and not args.sdxl:
        raise ModelError(f"--from_webui: '{args.lora_path}' is an SDXL LoRA (lora_te1_ / lora_te2_ keys); "
                         "add --sdxl and --model with the SDXL base model folder.")
    if args.sdxl and args.model is None:
        raise ModelError("--from_webui --sdxl: give --model, the SDXL base model folder whose module names decode the keys.")
    states = webui_to_native(state, meta_module_names(args.model), SDXL_WEBUI_PREFIX if args.sdxl else WEBUI_PREFIX)
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
                                                   ("--lora_path_TE2", args.lora_path_TE2)) if path}
    if args.from_webui:  # the folder's files, named as from_webui names them
        outputs = [Path(args.dump_path) / f"{part}-{Path(args.lora_path).stem}.safetensors" for part in PARTS]
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
    parser.add_argument("--lora_path", required=True, help="U-Net LoRA (native), or the webui file with --from_webui")
    parser.add_argument("--lora_path_TE", default=None, help="text-encoder LoRA (native), if any")
    parser.add_argument("--lora_path_TE2", default=None, help="SDXL: second text-encoder LoRA (native), if any")
    parser.add_argument("--sdxl", action="store_true",
                        help="SDXL LoRA: kohya's SDXL names (lora_unet_, lora_te1_, lora_te2_); --from_webui needs --model")
    parser.add_argument("--dump_path", required=True, help="output file (a folder with --from_webui)")
    parser.add_argument("--model", default=None,
                        help="--from_webui: base model folder whose module names decode the keys (default: SD1.x/2.x layout)")
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
