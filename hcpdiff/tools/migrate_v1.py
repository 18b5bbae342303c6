"""Write an HCP-Diffusion v1 config in today's spelling: `python -m hcpdiff.tools.migrate_v1 OLD.yaml NEW.yaml`.

OLD is loaded as v1 loaded it (its `_base_` files merged, interpolations resolved), translated key by key, and written
as one self-contained file (v1's defaults from its bases made explicit). What changed is listed on stderr; a config
with parts that have no counterpart is not written: one `error:` line names each such key and what replaces it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from hcpdiff.cli import run_cli
from hcpdiff.config.loader import load_config, load_tree
from hcpdiff.config.v1_compat import is_v1_infer, is_v1_train, referenced_keys
from hcpdiff.config.v1_infer import translate_infer
from hcpdiff.config.v1_train import translate_train
from hcpdiff.errors import ConfigError

INFER_KEYS = ("pretrained_model", "infer_args", "interface", "new_components", "prompt")
# exp_dir's run timestamp stays a resolver, so every run of the new file gets its own folder
KEEP_RAW = re.compile(r"^[^$]*\$\{hcp\.time:\}[^$]*$")


def migrate(old: Path) -> tuple[dict, str, object]:
    """(today's config tree, 'train' or 'infer', its Translation) for a v1 config file."""
    raw = load_tree(old.resolve(), {})
    tree = OmegaConf.to_container(load_config(old), resolve=True)
    kind = "infer" if any(key in tree for key in INFER_KEYS) and "data" not in tree else "train"
    if not (is_v1_infer(tree) if kind == "infer" else is_v1_train(tree)):
        print(f"note: {old} uses no HCP-Diffusion v1 key; written as it loads.", file=sys.stderr)
    if kind == "train":
        from hcpdiff.families import TRAINABLE_PARTS
        from hcpdiff.train.specs import top_level_keys

        out = translate_train(tree, referenced_keys(raw), top_level_keys(TRAINABLE_PARTS))
    else:
        out = translate_infer(tree, referenced_keys(raw))
    out.raise_refused(str(old))
    if isinstance(raw.get("exp_dir"), str) and KEEP_RAW.match(raw["exp_dir"]) and "exp_dir" in out.tree:
        out.tree["exp_dir"] = raw["exp_dir"]
    return out.tree, kind, out


def main(argv: list[str]) -> int:
    """Parse OLD NEW, translate OLD, write NEW, list the changes on stderr."""
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.migrate_v1", description=__doc__.splitlines()[0])
    parser.add_argument("old", help="an HCP-Diffusion v1 config (training or visualizer)")
    parser.add_argument("new", help="where to write the config in today's spelling")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    old, new = Path(args.old), Path(args.new)
    if not old.is_file():
        raise ConfigError(f"config file '{old}' not found.")
    tree, kind, out = migrate(old)
    command = ("python -m hcpdiff.train_ac_single --cfg" if kind == "train" else "python -m hcpdiff.visualizer --cfg")
    header = (f"# Migrated from HCP-Diffusion v1's {old.name} by `python -m hcpdiff.tools.migrate_v1`; v1's bases are "
              f"merged in,\n# so every key is explicit. Run: {command} {new}\n")
    new.parent.mkdir(parents=True, exist_ok=True)
    new.write_text(header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=120))
    for line in out.notes + ([f"dropped (no effect here): {', '.join(out.dropped)}"] if out.dropped else []):
        print(f"changed: {line}", file=sys.stderr)
    print(f"wrote {new}")
    return 0


if __name__ == "__main__":
    run_cli(main)
