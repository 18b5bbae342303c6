"""HCP-Diffusion v1 configs read as today's: v1's keys renamed, its `_target_`s replaced, its defaults made explicit.

A v1 config (one that uses any key or `_target_` only v1 has) is translated as a whole, after its `_base_` files are
merged, its overrides applied and its interpolations resolved in v1's own spelling. What has no counterpart stops
the run with one line naming each such key and what replaces it; what changes nothing (xformers, ckpt_type, ...) is
dropped with a note. `python -m hcpdiff.tools.migrate_v1` writes the translated config to a file. The translations
themselves are hcpdiff/config/v1_train.py and v1_infer.py; v1_targets.py is the `_target_` table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcpdiff.errors import ConfigError

V1_TRAIN_KEYS = ("tokenizer_pt", "logger", "ckpt_type", "vis_info", "plugin_unet", "plugin_TE")
# (v1's `emb_dir` is today's too: prompt embeddings by name)
V1_INFER_KEYS = ("N_repeats", "clip_final_norm", "encoder_attention_mask", "amp", "condition", "ex_input",
                 "offload", "vae_optimize", "interface", "save_model")
V1_MODEL_KEYS = ("enable_xformers", "force_cast_precision", "ema_unet", "ema_text_encoder", "clip_final_norm",
                 "tokenizer", "noise_scheduler", "unet", "text_encoder", "vae")
V1_TRAIN_SECTION_KEYS = ("set_grads_to_none", "cfg_scale", "optimizer_pt", "scheduler_pt", "scale_lr_pt")
DELETED = "---"  # v1's "remove the inherited key" value
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


def target_of(node: Any) -> str | None:
    return node.get("_target_") if isinstance(node, dict) else None


def drop_deleted(node: Any) -> None:
    """Remove v1's `key: ---` entries (v1 deleted the inherited key)."""
    if isinstance(node, dict):
        for key in [key for key, value in node.items() if value == DELETED]:
            del node[key]
        for value in node.values():
            drop_deleted(value)
    elif isinstance(node, list):
        for value in node:
            drop_deleted(value)


def any_target(node: Any, prefix: tuple[str, ...]) -> bool:
    if isinstance(node, dict):
        return (isinstance(target_of(node), str) and target_of(node).startswith(prefix)) or any(
            any_target(value, prefix) for value in node.values())
    if isinstance(node, list):
        return any(any_target(value, prefix) for value in node)
    return False


V1_ONLY_TARGETS = ("hcpdiff.data.bucket.", "hcpdiff.data.source.", "hcpdiff.data.TextImage", "hcpdiff.data.CropInfo",
                   "hcpdiff.loggers.", "hcpdiff.loss.", "hcpdiff.utils.", "hcpdiff.models.controlnet", "hcpdiff.noise.",
                   "hcpdiff.vis.", "hcpdiff.data.data_processor", "torch.nn.MSELoss")


def is_v1_train(tree: dict) -> bool:
    """True when a training config uses a key or `_target_` only HCP-Diffusion v1 has."""
    if any(key in tree for key in V1_TRAIN_KEYS) or any_target(tree, V1_ONLY_TARGETS):
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


def drop_variables(tree: dict, known: set[str], variables: set[str]) -> None:
    """Remove top-level v1 variables (`data_cfg`, `object_name`): their values are resolved into the keys that used
    them, and a key nothing interpolates any more would be refused as a typo when the written config is loaded."""
    used = {path.split(".")[0] for path in variables}
    for key in [key for key in tree if key not in known and key in used]:
        del tree[key]


# ------------------------------------------------------------------------------------------------------ loading
def load_maybe_v1(path: str, overrides: list[str], *, kind: str,
                  top_level: set[str] | None = None) -> tuple[Any, Translation | None]:
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
    from hcpdiff.config.v1_infer import translate_infer  # the translations import this module
    from hcpdiff.config.v1_train import translate_train

    out = (translate_train(tree, variables, top_level) if kind == "train" else translate_infer(tree, variables))
    out.raise_refused(str(path))
    return OmegaConf.create(out.tree), out
