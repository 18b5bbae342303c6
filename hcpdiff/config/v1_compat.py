"""HCP-Diffusion v1 configs read as today's: v1's keys renamed, its `_target_`s replaced, its defaults made explicit.

A v1 config (one that uses any key or `_target_` only v1 has) is translated as a whole, after its `_base_` files are
merged, its overrides applied and its interpolations resolved in v1's own spelling. What has no counterpart stops
the run with one line naming each such key and what replaces it; what changes nothing (xformers, ckpt_type, ...) is
dropped with a note. `python -m hcpdiff.tools.migrate_v1` writes the translated config to a file.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hcpdiff.config import v1_targets as targets
from hcpdiff.errors import ConfigError

V1_TRAIN_KEYS = ("tokenizer_pt", "logger", "ckpt_type", "vis_info", "plugin_unet", "plugin_TE")
V1_INFER_KEYS = ("emb_dir", "N_repeats", "clip_final_norm", "encoder_attention_mask", "amp", "condition", "ex_input",
                 "offload", "vae_optimize", "interface", "save_model")
V1_MODEL_KEYS = ("enable_xformers", "force_cast_precision", "ema_unet", "ema_text_encoder", "clip_final_norm",
                 "tokenizer", "noise_scheduler", "unet", "text_encoder", "vae")
V1_TRAIN_SECTION_KEYS = ("set_grads_to_none", "cfg_scale", "optimizer_pt", "scheduler_pt", "scale_lr_pt")
DELETED = "---"  # v1's "remove the inherited key" value
V1_DEFAULT_LR = 1e-5  # v1's lr for a group that gives none
LORA_KEYS = ("lr", "layers", "rank", "alpha", "dropout", "type")
TEMPLATE_DIR = "prompt_tuning_template/"  # v1's shipped prompt templates, today's cfgs/prompt_templates/
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # `${model.lr}`, also inside `${hcp.eval:"${a.b}"}`
MIGRATE_HINT = "python -m hcpdiff.tools.migrate_v1 OLD.yaml NEW.yaml"


@dataclass
class Translation:
    """A config in today's spelling, what was changed on the way, and what could not be."""

    tree: dict
    notes: list[str] = field(default_factory=list)  # `key`: what became of it
    dropped: list[str] = field(default_factory=list)  # v1 keys that change nothing here
    refused: dict[str, list[str]] = field(default_factory=dict)  # what to use instead -> the keys it is for

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"`{key}`: {text}")

    def drop(self, node: dict, key: str, where: str = "") -> None:
        """Remove a v1 key that changes nothing here (said once, by name)."""
        if key in node:
            del node[key]
            self.dropped.append(f"{where}.{key}" if where else key)

    def refuse(self, key: str, text: str) -> None:
        self.refused.setdefault(text, []).append(f"`{key}`")

    def summary(self) -> str:
        """The changes and the dropped keys, on one line."""
        parts = list(self.notes) + ([f"dropped (no effect here): {', '.join(self.dropped)}"] if self.dropped else [])
        return "; ".join(parts) or "no changes"

    def raise_refused(self, file: str) -> None:
        """One ConfigError line naming every v1 key that has no counterpart, and what replaces it."""
        if self.refused:
            raise ConfigError(f"{file} is an HCP-Diffusion v1 config that cannot run here: " + "; ".join(
                f"{', '.join(keys)}: {reason}" for reason, keys in self.refused.items()) + ".")


def referenced_keys(tree: Any) -> set[str]:
    """Absolute key paths that string values interpolate (`${model.lr}` -> model.lr): v1's variables."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            found.update(_REFERENCE.findall(node))
    return found


def _target(node: Any) -> str | None:
    return node.get("_target_") if isinstance(node, dict) else None


def _drop_deleted(node: Any) -> None:
    """Remove v1's `key: ---` entries (v1 deleted the inherited key)."""
    if isinstance(node, dict):
        for key in [key for key, value in node.items() if value == DELETED]:
            del node[key]
        for value in node.values():
            _drop_deleted(value)
    elif isinstance(node, list):
        for value in node:
            _drop_deleted(value)


def _any_target(node: Any, prefix: tuple[str, ...]) -> bool:
    if isinstance(node, dict):
        return (isinstance(_target(node), str) and _target(node).startswith(prefix)) or any(
            _any_target(value, prefix) for value in node.values())
    if isinstance(node, list):
        return any(_any_target(value, prefix) for value in node)
    return False


V1_ONLY_TARGETS = ("hcpdiff.data.bucket.", "hcpdiff.data.source.", "hcpdiff.data.TextImage", "hcpdiff.data.CropInfo",
                   "hcpdiff.loggers.", "hcpdiff.loss.", "hcpdiff.utils.", "hcpdiff.models.controlnet", "hcpdiff.noise.",
                   "hcpdiff.vis.", "hcpdiff.data.data_processor", "torch.nn.MSELoss")


def is_v1_train(tree: dict) -> bool:
    """True when a training config uses a key or `_target_` only HCP-Diffusion v1 has."""
    if any(key in tree for key in V1_TRAIN_KEYS) or _any_target(tree, V1_ONLY_TARGETS):
        return True
    model, train = tree.get("model") or {}, tree.get("train") or {}
    loss = train.get("loss") if isinstance(train, dict) else None
    return (isinstance(model, dict) and any(key in model for key in V1_MODEL_KEYS)) or (
        isinstance(train, dict) and any(key in train for key in V1_TRAIN_SECTION_KEYS)) or (
        isinstance(loss, dict) and ("criterion" in loss or "type" in loss)) or (
        isinstance((train.get("scheduler") if isinstance(train, dict) else None), dict)
        and "num_training_steps" in train["scheduler"])


def is_v1_infer(tree: dict) -> bool:
    """True when a visualizer config uses a key or `_target_` only HCP-Diffusion v1 has."""
    merge = tree.get("merge")
    v1_merge = isinstance(merge, dict) and any(
        not isinstance(group, dict) or "part" in group or "plugin" in group for group in merge.values())
    return any(key in tree for key in V1_INFER_KEYS) or v1_merge or ("seed" in tree and tree["seed"] is None)


# ------------------------------------------------------------------------------------------------------ training
def translate_train(tree: dict, variables: set[str] = frozenset(), known_top_level: set[str] | None = None,
                    ) -> Translation:
    """A resolved v1 training config in today's spelling. `variables`: keys other values interpolated (v1 configs
    keep such variables inside `model:`, which today reads by name)."""
    tree = copy.deepcopy(tree)
    _drop_deleted(tree)
    out = Translation(tree)
    _top_level(tree, out, known_top_level)
    _model(tree, out, variables)
    _train_section(tree, out)
    for name, dataset in list((tree.get("data") or {}).items()):
        if isinstance(dataset, dict):
            _dataset(dataset, f"data.{name}", out)
    for key in [key for key in tree if key.startswith("lora_")]:
        for index, group in enumerate(tree[key] or []):
            _lora_group(group, f"{key}[{index}]", out)
    if known_top_level is not None:
        _drop_variables(tree, set(known_top_level) | {"embeddings"}, variables)
    for key in ("unet", "text_encoder", "text_encoder_2"):
        for index, group in enumerate(tree.get(key) or []):
            if isinstance(group, dict) and "lr" not in group:
                group["lr"] = V1_DEFAULT_LR
                out.note(f"{key}[{index}].lr", f"{V1_DEFAULT_LR:g} (v1's default)")
    return out


def _drop_variables(tree: dict, known: set[str], variables: set[str]) -> None:
    """Remove top-level v1 variables (`data_cfg`, `object_name`): their values are resolved into the keys that used
    them, and a key nothing interpolates any more would be refused as a typo when the written config is loaded."""
    used = {path.split(".")[0] for path in variables}
    for key in [key for key in tree if key not in known and key in used]:
        del tree[key]


def _top_level(tree: dict, out: Translation, known_top_level: set[str] | None) -> None:
    out.drop(tree, "ckpt_type")  # checkpoints are always safetensors
    out.drop(tree, "vis_info")  # previews are `previewer: {step, prompts}`
    for key in ("plugin_unet", "plugin_TE"):
        plugins = tree.pop(key, None)
        if plugins:
            controlnet = _any_target(plugins, ("hcpdiff.models.controlnet",))
            out.refuse(key, targets.CONTROLNET if controlnet else "v1 plugins have no replacement")
    tokens = tree.pop("tokenizer_pt", None)
    if isinstance(tokens, dict) and tokens.get("train"):
        if known_top_level is not None and "embeddings" in known_top_level:
            tree["embeddings"] = {"emb_dir": tokens.get("emb_dir", "embs/"), "train": tokens["train"]}
            out.note("tokenizer_pt", "-> embeddings")
        else:
            out.refuse("tokenizer_pt.train", "textual inversion is not in this build; its spelling is `embeddings: "
                                             "{emb_dir, train: [{name, lr}]}` (issue 15 item 1)")
    elif tokens is not None:
        out.dropped.append("tokenizer_pt")
    if "logger" in tree:
        _loggers(tree.pop("logger"), tree, out)
    previewer = tree.get("previewer")
    if _target(previewer):
        out.refuse(f"previewer._target_: {_target(previewer)}", targets.refused_reason(_target(previewer)))


def _loggers(loggers: Any, tree: dict, out: Translation) -> None:
    """v1's logger list -> train.log_with and train.log_step."""
    log_with, steps = ["tensorboard"], []
    for index, node in enumerate(loggers or []):
        target = _target(node) or "?"
        if target not in targets.LOGGERS:
            out.refuse(f"logger[{index}]._target_: {target}", targets.refused_reason(target))
            continue
        if targets.LOGGERS[target] and targets.LOGGERS[target] not in log_with:
            log_with.append(targets.LOGGERS[target])
        if isinstance(node.get("log_step"), int):
            steps.append(node["log_step"])
    train = tree.setdefault("train", {})
    train["log_with"] = log_with
    if steps:
        train["log_step"] = min(steps)
    out.note("logger", f"-> train.log_with: {log_with}" + (f", train.log_step: {min(steps)}" if steps else "")
             + " (train.log and tblog/ are always written)")


def _model(tree: dict, out: Translation, variables: set[str]) -> None:
    model = tree.get("model")
    if not isinstance(model, dict):
        return
    from hcpdiff.train.specs import ModelSpec

    known = {f.name for f in fields(ModelSpec)}
    # SDPA attention is always used; accelerate's mixed_precision casts; EMA is model.ema: {decay}
    for key in ("enable_xformers", "force_cast_precision"):
        out.drop(model, key, "model")
    for key in ("ema_unet", "ema_text_encoder"):
        if model.get(key):
            out.refuse(f"model.{key}", "use model.ema: {decay: 0.999}")
        out.drop(model, key, "model")
    if "clip_final_norm" in model:
        if model.pop("clip_final_norm") is not False:
            out.dropped.append("model.clip_final_norm")
        else:
            out.note("model.clip_final_norm", "dropped (clip_skip here follows diffusers: SDXL's penultimate "
                                              "layer without the final norm, SD's with it)")
    for key in ("tokenizer", "noise_scheduler", "unet", "text_encoder", "vae"):
        if key in model:
            node = model.pop(key)
            if node is not None:
                target = _target(node) or "?"
                out.refuse(f"model.{key}: {target}", f"the model's parts load from model.pretrained_model_name_or_path; "
                           f"{targets.refused_reason(target)}")
    ema = model.get("ema")
    if _target(ema) in targets.EMA:
        model["ema"] = {"decay": ema.get("decay_max", 0.9997)}
        out.note("model.ema", f"-> {{decay: {model['ema']['decay']}}} (a fixed decay, without v1's warm-up)")
    elif _target(ema):
        out.refuse(f"model.ema: {_target(ema)}", "use model.ema: {decay: 0.999}")
    for key in [key for key in model if key not in known]:
        del model[key]  # v1's examples_noob keep variables here (already resolved into their users); v1 read none
        if f"model.{key}" not in variables:
            out.note(f"model.{key}", "dropped (not a model setting; v1 ignored it too)")


def _train_section(tree: dict, out: Translation) -> None:
    train = tree.get("train")
    if not isinstance(train, dict):
        return
    out.drop(train, "set_grads_to_none", "train")  # gradients are set to None
    cfg_scale = train.pop("cfg_scale", None)
    if cfg_scale is not None and str(cfg_scale) not in ("1", "1.0"):
        out.refuse("train.cfg_scale", targets.DREAMARTIST)
    for key in ("optimizer_pt", "scheduler_pt", "scale_lr_pt"):
        if key in train and not tree.get("embeddings"):
            out.drop(train, key, "train")
    resume = train.get("resume")
    if isinstance(resume, dict):
        out.refuse("train.resume", "v1's {ckpt_path, start_step} is replaced by train.resume: <experiment folder>")
    scheduler = train.get("scheduler")
    if isinstance(scheduler, dict):
        total = scheduler.pop("num_training_steps", None)
        if total is not None and train.get("train_steps") not in (None, total):
            out.note("train.scheduler.num_training_steps", f"{total} dropped; the schedule spans "
                                                           f"train.train_steps ({train.get('train_steps')})")
        if scheduler.get("name") == "one_cycle":
            scheduler["name"] = "cosine"
            out.note("train.scheduler.name", "one_cycle -> cosine (linear warm-up, then cosine decay)")
    loss = train.get("loss")
    if isinstance(loss, dict):
        _loss(loss, out)


def _loss(loss: dict, out: Translation) -> None:
    criterion = loss.pop("criterion", None)
    target = _target(criterion)
    if target in targets.MIN_SNR_LOSSES:
        loss["min_snr_gamma"] = float(criterion.get("gamma", 5.0))
        out.note("train.loss.criterion", f"MinSNRLoss -> train.loss.min_snr_gamma: {loss['min_snr_gamma']:g}")
    elif target is not None and target not in targets.MSE_LOSSES:
        out.refuse(f"train.loss.criterion: {target}", targets.refused_reason(target))
    kind = loss.pop("type", None)
    if kind == "sample":
        loss["prediction_type"] = "sample"
        out.note("train.loss.type", "sample -> train.loss.prediction_type: sample")
    elif kind not in (None, "eps"):
        out.refuse("train.loss.type", f"'{kind}': use train.loss.prediction_type (epsilon | v_prediction | sample)")


def _dataset(dataset: dict, where: str, out: Translation) -> None:
    target = dataset.pop("_target_", None)
    dataset.pop("_partial_", None)
    if target is not None and target not in targets.DATASETS:
        out.refuse(f"{where}._target_: {target}", targets.refused_reason(target))
    if dataset.get("att_mask_encode"):
        out.refuse(f"{where}.att_mask_encode", "attention-mask encoding has no replacement; remove it")
    out.drop(dataset, "att_mask_encode", where)
    for name, source in (dataset.get("source") or {}).items():
        if isinstance(source, dict):
            _source(source, f"{where}.source.{name}", out)
    bucket = dataset.get("bucket")
    if isinstance(bucket, dict):
        _bucket(bucket, f"{where}.bucket", out)


def _source(source: dict, where: str, out: Translation) -> None:
    target = source.pop("_target_", None)
    if target is not None and target not in targets.SOURCES:
        out.refuse(f"{where}._target_: {target}", targets.refused_reason(target))
    if source.get("att_mask") is not None:
        out.refuse(f"{where}.att_mask", "attention-mask weighted loss has no replacement; remove it")
    source.pop("att_mask", None)
    caption_file = source.get("caption_file")
    if isinstance(caption_file, dict):  # v1 caption loader (`_targe_` as v1's DreamArtist++ example spells it)
        source["caption_file"] = caption_file.get("path")
        out.note(f"{where}.caption_file", f"-> '{caption_file.get('path')}' (the format is read from the file)")
    template = source.get("prompt_template")
    if isinstance(template, str) and template.startswith(TEMPLATE_DIR) and not Path(template).exists():
        source["prompt_template"] = "cfgs/prompt_templates/" + template[len(TEMPLATE_DIR):]
        out.note(f"{where}.prompt_template", f"-> {source['prompt_template']}")
    transforms = source.pop("text_transforms", None)
    if transforms is not None:
        _text_transforms(transforms, source, f"{where}.text_transforms", out)
    for key, value in (source.get("word_names") or {}).items():
        if isinstance(value, list):
            out.refuse(f"{where}.word_names.{key}", targets.DREAMARTIST)


def _text_transforms(node: Any, source: dict, where: str, out: Translation) -> None:
    """v1's Compose of TagShuffle / TagDropout / TemplateFill -> the source's tag_shuffle / tag_dropout / word_names."""
    items = node.get("transforms", []) if isinstance(node, dict) else node
    for index, item in enumerate(items or []):
        target = (_target(item) or "?").rpartition(".")[2]
        if target == "TagShuffle":
            source["tag_shuffle"] = True
        elif target == "TagDropout":
            source["tag_dropout"] = float(item.get("p", 0.1))
        elif target == "TemplateFill":
            words = item.get("word_names") or {}
            source["word_names"] = {**words, **(source.get("word_names") or {})}
        else:
            out.refuse(f"{where}.transforms[{index}]: {_target(item)}", targets.refused_reason(str(_target(item))))
    out.note(where, "-> the source's tag_shuffle / tag_dropout / word_names")


def _bucket(bucket: dict, where: str, out: Translation) -> None:
    target = bucket.get("_target_")
    if target in targets.BUCKETS:
        new = targets.BUCKETS[target]
        if new != target:
            out.note(f"{where}._target_", f"-> {new}")
        bucket["_target_"] = new
        bucket["_partial_"] = True
        bucket.pop("pre_build_bucket", None)
        if new.endswith("FixedBucket"):
            bucket.pop("num_bucket", None)
    elif target in targets.SIZE_BUCKETS:
        area = bucket.get("max_area") or 4096 * 4096
        kept = {key: bucket[key] for key in ("step_size",) if key in bucket}
        bucket.clear()
        bucket.update({"_target_": "hcpdiff.data.MaxPixelsBucket", "_partial_": True, "max_pixels": area, **kept})
        out.note(f"{where}._target_", f"{target} -> hcpdiff.data.MaxPixelsBucket (each image at its own size)")
    elif target is not None and target.startswith("hcpdiff.data.bucket."):
        out.refuse(f"{where}._target_: {target}", targets.refused_reason(target))


def _lora_group(group: Any, where: str, out: Translation) -> None:
    """v1's LoRA defaults made explicit (lr 1e-5, rank 1, scale alpha / rank with alpha 1) and its extras refused."""
    if not isinstance(group, dict):
        return
    if "branch" in group:
        out.refuse(f"{where}.branch", targets.DREAMARTIST)
        group.pop("branch")
    if group.get("mask") is not None:
        out.refuse(f"{where}.mask", targets.DREAMARTIST)
    group.pop("mask", None)
    for key, bad, why in (("svd_init", True, "SVD initialisation has no replacement"),
                          ("bias", True, "LoRA bias has no replacement")):
        if group.pop(key, None) == bad:
            out.refuse(f"{where}.{key}", why)
    if group.get("type") == "loha_group":
        out.refuse(f"{where}.type", "loha_group has no replacement; use type: loha")
    group.setdefault("lr", V1_DEFAULT_LR)
    group.setdefault("rank", 1)
    auto_scale = group.pop("alpha_auto_scale", True)
    alpha = float(group.get("alpha", 1.0))
    if not auto_scale:  # v1 used alpha itself as the scale; here the scale is alpha / rank
        if isinstance(group["rank"], float):
            out.refuse(f"{where}.alpha_auto_scale", "false with a float rank has no replacement; give an int rank")
        alpha *= group["rank"] if isinstance(group["rank"], int) else 1
    if group.get("alpha") != alpha:
        out.note(f"{where}.alpha", f"{alpha:g} (v1's scale alpha / rank made explicit)")
    group["alpha"] = alpha
    group.pop("inplace", None)


# ------------------------------------------------------------------------------------------------------ visualizer
def translate_infer(tree: dict, variables: set[str] = frozenset()) -> Translation:
    """A resolved v1 visualizer config in today's spelling."""
    from hcpdiff.infer.specs import SaveSpec, VisualizerSpec

    tree = copy.deepcopy(tree)
    _drop_deleted(tree)
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
        out.refuse("ex_input", targets.refused_reason(_target(next(iter(ex_input.values()), {})) or "?"))
    if tree.get("save_model"):
        out.refuse("save_model", "saving a merged model is not supported; lora_convert writes webui / diffusers LoRAs")
    tree.pop("save_model", None)
    _interfaces(tree, out, {f.name for f in fields(SaveSpec)})
    _merge(tree, out)
    _drop_variables(tree, {f.name for f in fields(VisualizerSpec)}, variables)  # `exp_dir`, `model_steps`
    return out


def _interfaces(tree: dict, out: Translation, save_keys: set[str]) -> None:
    interfaces = tree.pop("interface", None)
    for index, node in enumerate(interfaces or []):
        target = _target(node)
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


# ------------------------------------------------------------------------------------------------------ loading
def load_maybe_v1(path: str, overrides: list[str], *, kind: str, top_level: set[str] | None = None):
    """`load_config`, then, for a v1 config, its translation (one warning line lists what changed; what cannot run
    is one ConfigError). `kind`: "train" or "infer". Returns (DictConfig, its Translation or None for today's)."""
    from omegaconf import OmegaConf

    from hcpdiff.config.loader import load_config, load_tree

    extra = set(V1_TRAIN_KEYS if kind == "train" else V1_INFER_KEYS)
    cfg = load_config(path, overrides, top_level=None if top_level is None else set(top_level) | extra)
    tree = OmegaConf.to_container(cfg, resolve=True)
    if not (is_v1_train(tree) if kind == "train" else is_v1_infer(tree)):
        return cfg, None
    variables = referenced_keys(load_tree(Path(path).resolve(), {}))
    out = (translate_train(tree, variables, top_level) if kind == "train" else translate_infer(tree, variables))
    out.raise_refused(str(path))
    return OmegaConf.create(out.tree), out
