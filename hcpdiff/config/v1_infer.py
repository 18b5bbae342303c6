"""HCP-Diffusion v1 visualizer configs in today's spelling (see hcpdiff/config/v1_compat.py for when this runs)."""
from __future__ import annotations

import copy
from dataclasses import fields

from hcpdiff.config import v1_targets as targets
from hcpdiff.config.v1_compat import Translation, drop_deleted, drop_variables, target_of


def translate_infer(tree: dict, variables: set[str] = frozenset()) -> Translation:
    """A resolved v1 visualizer config in today's spelling."""
    from hcpdiff.infer.specs import SaveSpec, VisualizerSpec

    tree = copy.deepcopy(tree)
    drop_deleted(tree)
    out = Translation(tree)
    # dtype decides precision; prompts are encoded in 75-token chunks; clip_skip follows diffusers
    for key in ("encoder_attention_mask", "amp", "N_repeats", "clip_final_norm"):
        out.drop(tree, key)
    if "emb_dir" in tree:  # embeddings by name in prompts are issue 15 item 1, not in this build
        out.drop(tree, "emb_dir")
    for key in ("offload", "vae_optimize"):
        node = tree.pop(key, None)
        if isinstance(node, dict) and any(node.values()):
            out.note(key, "dropped (renders without CPU offload / VAE tiling; the images are the same)")
    if "seed" in tree and tree["seed"] is None:
        tree["seed"] = 42
        out.note("seed", "null (random) -> 42; image i of a prompt uses seed + i")
    condition = tree.pop("condition", None)
    if isinstance(condition, dict):
        kind = condition.get("type")
        if kind in ("i2i", "inpaint"):
            tree["init_image"] = condition.get("image")
            if kind == "inpaint":
                tree["mask_image"] = condition.get("mask")
            out.note("condition", f"-> init_image{' / mask_image' if kind == 'inpaint' else ''}")
        else:
            out.refuse("condition.type", f"'{kind}': use init_image (img2img) or init_image + mask_image (inpaint)")
    ex_input = tree.pop("ex_input", None)
    if ex_input:
        out.refuse("ex_input", targets.refused_reason(target_of(next(iter(ex_input.values()), {})) or "?"))
    if tree.get("save_model"):
        out.refuse("save_model", "saving a merged model is not supported; lora_convert writes webui / diffusers LoRAs")
    tree.pop("save_model", None)
    _interfaces(tree, out, {f.name for f in fields(SaveSpec)})
    _merge(tree, out)
    drop_variables(tree, {f.name for f in fields(VisualizerSpec)}, variables)  # `exp_dir`, `model_steps`
    return out


def _interfaces(tree: dict, out: Translation, save_keys: set[str]) -> None:
    interfaces = tree.pop("interface", None)
    for index, node in enumerate(interfaces or []):
        target = target_of(node)
        if target not in targets.DISK_INTERFACE:
            out.refuse(f"interface[{index}]: {target}", "images are written to save.out_dir only")
            continue
        save = tree.setdefault("save", {})
        if node.get("save_root") is not None:
            save["out_dir"] = node["save_root"]
        for key in ("save_cfg", "image_type", "quality"):
            if key in node and key in save_keys:
                save[key] = node[key]
        out.note(f"interface[{index}]", "DiskInterface -> save: {out_dir, save_cfg, image_type, quality}")


def _merge(tree: dict, out: Translation) -> None:
    merge = tree.get("merge")
    if not isinstance(merge, dict):
        return
    if "plugin_cfg" in merge:
        out.refuse("merge.plugin_cfg", targets.CONTROLNET)
    for name in list(merge):
        group = merge[name]
        if not isinstance(group, dict):
            del merge[name]  # v1 kept variables (alpha, exp_dir) among the groups; already resolved into them
            continue
        if group.get("part"):
            out.refuse(f"merge.{name}.part", "merging full fine-tuned weights is not supported yet")
        if group.get("plugin"):
            out.refuse(f"merge.{name}.plugin", targets.CONTROLNET)
        group.pop("part", None)
        group.pop("plugin", None)
        group["lora"] = group.get("lora") or []
        for index, item in enumerate(group["lora"]):
            if isinstance(item, dict) and item.pop("mask", None) is not None:
                out.refuse(f"merge.{name}.lora[{index}].mask", targets.DREAMARTIST)
