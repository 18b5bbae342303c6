"""HCP-Diffusion v1 training configs in today's spelling (see hcpdiff/config/v1_compat.py for when this runs)."""
from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

from hcpdiff.config import v1_targets as targets
from hcpdiff.config.v1_compat import Translation, any_target, drop_deleted, drop_variables, target_of

V1_DEFAULT_LR = 1e-5  # v1's lr for a group that gives none
TEMPLATE_DIR = "prompt_tuning_template/"  # v1's shipped prompt templates, today's cfgs/prompt_templates/


def translate_train(tree: dict, variables: set[str] = frozenset(), known_top_level: set[str] | None = None,
                    ) -> Translation:
    """A resolved v1 training config in today's spelling. `variables`: keys other values interpolated (v1 configs
    keep such variables inside `model:`, which today reads by name)."""
    tree = copy.deepcopy(tree)
    drop_deleted(tree)
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
    _split_sdxl_text_encoder_groups(tree, out)
    if known_top_level is not None:
        drop_variables(tree, set(known_top_level) | {"embeddings"}, variables)
    for key in ("unet", "text_encoder", "text_encoder_2"):
        for index, group in enumerate(tree.get(key) or []):
            if isinstance(group, dict) and "lr" not in group:
                group["lr"] = V1_DEFAULT_LR
                out.note(f"{key}[{index}].lr", f"{V1_DEFAULT_LR:g} (v1's default)")
    return out




def _top_level(tree: dict, out: Translation, known_top_level: set[str] | None) -> None:
    out.drop(tree, "ckpt_type")  # checkpoints are always safetensors
    out.drop(tree, "vis_info")  # previews are `previewer: {step, prompts}`
    for key in ("plugin_unet", "plugin_TE"):
        plugins = tree.pop(key, None)
        if plugins:
            controlnet = any_target(plugins, ("hcpdiff.models.controlnet",))
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
    if target_of(previewer):
        out.refuse(f"previewer._target_: {target_of(previewer)}", targets.refused_reason(target_of(previewer)))


def _loggers(loggers: Any, tree: dict, out: Translation) -> None:
    """v1's logger list -> train.log_with and train.log_step."""
    log_with, steps = ["tensorboard"], []
    for index, node in enumerate(loggers or []):
        target = target_of(node) or "?"
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
                target = target_of(node) or "?"
                out.refuse(f"model.{key}: {target}",
                           f"the model's parts load from model.pretrained_model_name_or_path; "
                           f"{targets.refused_reason(target)}")
    ema = model.get("ema")
    if target_of(ema) in targets.EMA:
        model["ema"] = {"decay": ema.get("decay_max", 0.9997)}
        out.note("model.ema", f"-> {{decay: {model['ema']['decay']}}} (a fixed decay, without v1's warm-up)")
    elif target_of(ema):
        out.refuse(f"model.ema: {target_of(ema)}", "use model.ema: {decay: 0.999}")
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
    for key in ("optimizer_pt", "scheduler_pt", "scale_lr_pt"):  # embeddings train in train.optimizer at their lr
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
    target = target_of(criterion)
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
        target = (target_of(item) or "?").rpartition(".")[2]
        if target == "TagShuffle":
            source["tag_shuffle"] = True
        elif target == "TagDropout":
            source["tag_dropout"] = float(item.get("p", 0.1))
        elif target == "TemplateFill":
            words = item.get("word_names") or {}
            source["word_names"] = {**words, **(source.get("word_names") or {})}
        else:
            out.refuse(f"{where}.transforms[{index}]: {target_of(item)}", targets.refused_reason(str(target_of(item))))
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


# v1 wrapped SDXL's two text encoders in one module: layer names under `clip_B.` are CLIP-L's, under `clip_bigG.`
# OpenCLIP bigG's; today each is its own part (text_encoder, text_encoder_2) with the names inside it.
SDXL_TEXT_PREFIXES = {"clip_B.": "lora_text_encoder", "clip_bigG.": "lora_text_encoder_2"}


def _sdxl_part(pattern: str) -> tuple[str, str] | None:
    """(today's group key, the pattern inside that encoder) for a v1 SDXL text-encoder layer pattern, else None."""
    regex = pattern.startswith("re:")
    body = pattern[3:] if regex else pattern
    for prefix, key in SDXL_TEXT_PREFIXES.items():
        for spelled in ((prefix, prefix.replace(".", r"\.")) if regex else (prefix,)):
            if body.startswith(spelled):
                return key, ("re:" if regex else "") + body[len(spelled):]
    return None


def _split_sdxl_text_encoder_groups(tree: dict, out: Translation) -> None:
    """v1 SDXL `lora_text_encoder` groups whose layers name `clip_B.` / `clip_bigG.` become `lora_text_encoder` /
    `lora_text_encoder_2` groups with the names inside each encoder; other patterns stay (CLIP-L's)."""
    groups = tree.get("lora_text_encoder") or []
    if not any(_sdxl_part(str(layer)) for group in groups if isinstance(group, dict)
               for layer in group.get("layers") or []):
        return
    split: dict[str, list] = {"lora_text_encoder": [], "lora_text_encoder_2": []}
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        by_key: dict[str, list[str]] = {}
        for layer in group.get("layers") or []:
            key, inside = _sdxl_part(str(layer)) or ("lora_text_encoder", str(layer))
            by_key.setdefault(key, []).append(inside)
        for key, layers in by_key.items():
            split[key].append({**group, "layers": layers})
        out.note(f"lora_text_encoder[{index}].layers", "clip_B. / clip_bigG. layers split into lora_text_encoder / "
                 "lora_text_encoder_2 (SDXL's two text encoders are separate parts here)")
    tree["lora_text_encoder"] = split["lora_text_encoder"]
    if split["lora_text_encoder_2"]:
        tree["lora_text_encoder_2"] = [*(tree.get("lora_text_encoder_2") or []), *split["lora_text_encoder_2"]]
