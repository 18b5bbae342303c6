"""Loading a config: `_base_` files merged, overrides applied, interpolations resolved last."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Collection, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hcpdiff.config.keypaths import did_you_mean, iter_leaves, join_key
from hcpdiff.config.merge import Origins, merge_layer
from hcpdiff.config.overrides import apply_overrides, parse_overrides
from hcpdiff.config.resolvers import RUN_TIME_KEY, RunClock, register_resolvers
from hcpdiff.config.yaml_io import read_yaml_file
from hcpdiff.errors import ConfigError

BASE_KEY = "_base_"
MISSING_VALUE = "???"
INTERPOLATED_NAME = re.compile(r"\$\{\s*([A-Za-z_]\w*)\s*[.\[}]")  # `${unet_lr}`, `${model.x}` -> the top-level name


def shown_path(path: Path) -> str:
    """A file as the user would write it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _base_entries(value: Any, file: Path) -> list[str]:
    """The `_base_` value of a file as a list of paths."""
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(entry, str) and entry for entry in entries):
        raise ConfigError(f"{shown_path(file)}: `_base_` must be a path or a list of paths, got {value!r}.")
    return entries


def config_root(file: Path) -> Path | None:
    """The nearest folder above `file` that holds a `cfgs/` folder: where the shipped configs' repo-relative
    `_base_` paths (`cfgs/train/...`) start."""
    for folder in file.resolve().parents:
        if (folder / "cfgs").is_dir():
            return folder
    return None


def find_base(entry: str, including_file: Path) -> Path:
    """Resolve a `_base_` entry: relative to the working directory, then to the including file's folder, then to
    the folder holding the `cfgs/` the including file lives in (so shipped configs load from anywhere)."""
    root = config_root(including_file)
    candidates = [Path(entry)] if Path(entry).is_absolute() else [
        Path.cwd() / entry, including_file.parent / entry, *([root / entry] if root is not None else [])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    places = [shown_path(including_file.parent) or "."] + ([shown_path(root) or "."] if root is not None else [])
    raise ConfigError(
        f"{shown_path(including_file)}: `_base_` file '{entry}' not found (looked in the working directory "
        f"and in {' and '.join(places)}).")


def load_tree(file: Path, origins: Origins, chain: tuple[Path, ...] = ()) -> dict:
    """One file merged over its bases, as a plain tree; `origins` gets the file that set each leaf."""
    if file in chain:
        raise ConfigError(f"`_base_` cycle: {' -> '.join(shown_path(step) for step in chain + (file,))}.")
    data = read_yaml_file(file, shown_path(file))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{shown_path(file)}: the top level must be a mapping of keys, got a {type(data).__name__}.")
    tree: Any = {}
    for entry in _base_entries(data.pop(BASE_KEY, None), file):
        base_origins: Origins = {}
        base_tree = load_tree(find_base(entry, file), base_origins, chain + (file,))
        tree = merge_layer(tree, base_tree, base_origins, origins)
    return merge_layer(tree, data, shown_path(file), origins)


def _short_message(err: Exception) -> str:
    """OmegaConf's message without its `full_key:` / `object_type=` trailer or wrapper prefix."""
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", first_line).rstrip(".")


def _failing_key(node: DictConfig | ListConfig, prefix: str = "") -> str | None:
    """The first key path whose value cannot be resolved (OmegaConf.resolve does not always say)."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        path = join_key(prefix, key)
        if OmegaConf.is_missing(node, key):
            continue
        try:
            child = node[key]
        except OmegaConfBaseException:
            return path
        if isinstance(child, (DictConfig, ListConfig)):
            found = _failing_key(child, path)
            if found:
                return found
    return None


def _nearest_origin(path: str, origins: Origins) -> str:
    """The origin of `path`, or of its closest ancestor (a key interpolated to a whole mapping)."""
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return "?"


# A plain interpolation inside a value: `${unet_lr}`, `${hcp.eval:${expr}}` refers to `expr`.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w]*(?:(?:\.[\w]+)|(?:\[\d+\]))*)\}")


def _dotted(key: str) -> str:
    """OmegaConf's `lora_unet[0].lr` as the tree's `lora_unet.0.lr`."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _raw_value(tree: Any, key: str) -> Any:
    """The unresolved value at a dotted path of the merged tree, or None."""
    node = tree
    for part in _dotted(key).split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _resolves(cfg: DictConfig, key: str) -> bool:
    try:
        OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        return True
    except OmegaConfBaseException:
        return False


def _blame(cfg: DictConfig, key: str, tree: dict, origins: Origins, seen: frozenset[str] = frozenset()) -> str:
    """`key` (in file); when its value only refers to a key that fails on its own, that key and the file that
    wrote it instead, since that is where the bad expression is (`lr: ${unet_lr}` in a base, the bad
    `unet_lr` in the user's file)."""
    raw = _raw_value(tree, key)
    references = [ref for ref in (_REFERENCE.findall(raw) if isinstance(raw, str) else [])
                  if _raw_value(tree, ref) is not None]  # a missing key is the error itself, not its source
    for reference in references:
        if reference not in seen and reference != key and not _resolves(cfg, reference):
            return _blame(cfg, reference, tree, origins, seen | {key})
    where = f"`{key}` (in {_nearest_origin(_dotted(key), origins)})"
    used = [f"`{ref}` (in {_nearest_origin(_dotted(ref), origins)})" for ref in references
            if _nearest_origin(_dotted(ref), origins) != _nearest_origin(_dotted(key), origins)]
    return where + (f" using {', '.join(used)}" if used else "")


def _resolve(tree: dict, origins: Origins, clock: RunClock) -> DictConfig:
    """Turn the merged tree into a DictConfig with every interpolation resolved."""
    register_resolvers()
    try:
        cfg = OmegaConf.create(tree)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"`{key}` (in {_nearest_origin(key, origins)}): {_short_message(err)}.") from err
    cfg[RUN_TIME_KEY] = clock.stamp
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or _failing_key(cfg) or "?"
        raise ConfigError(f"{_blame(cfg, key, tree, origins)}: {_short_message(err)}.") from err
    finally:
        del cfg[RUN_TIME_KEY]
    return cfg


def _check_no_missing(cfg: DictConfig, origins: Origins) -> None:
    """Values left as `???` must be given before anything runs."""
    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    missing = [path for path, value in iter_leaves(plain) if value == MISSING_VALUE]
    if missing:
        where = ", ".join(f"`{path}` (in {_nearest_origin(path, origins)})" for path in missing)
        raise ConfigError(f"{where}: required value not set (`???`); give it in the config or as {missing[0]}=VALUE.")


def interpolated_names(tree: Any) -> set[str]:
    """The top-level names that string values of the tree interpolate (`lr: ${unet_lr}` -> unet_lr)."""
    return {name for _, value in iter_leaves(tree) if isinstance(value, str)
            for name in INTERPOLATED_NAME.findall(value)}


def _check_top_level(tree: dict, known: Collection[str], origins: Origins) -> None:
    """Top-level keys must be known or be variables other values interpolate (`unet_lr`); typos are errors."""
    variables = interpolated_names(tree)
    unknown = [key for key in tree if key not in known and key not in variables and key != RUN_TIME_KEY]
    if unknown:
        def origin(key: str) -> str:  # a mapping's own key has no origin; its first leaf's file wrote it
            return origins.get(key) or next((o for path, o in origins.items() if path.startswith(key + ".")), "?")
        raise ConfigError("; ".join(
            f"`{key}` (in {origin(key)}): unknown top-level key{did_you_mean(key, sorted(known))}"
            for key in unknown) + ".")


def load_config_with_origins(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                             clock: RunClock | None = None,
                             top_level: Collection[str] | None = None) -> tuple[DictConfig, dict[str, str]]:
    """The resolved config and, for each leaf key path, the file that last set it (or "command line").

    `top_level`: the keys the caller reads at the top level; any other key that no value interpolates is an error.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' not found.")
    origins: Origins = {}
    parsed = parse_overrides(overrides)
    tree = load_tree(file.resolve(), origins)
    apply_overrides(tree, parsed, origins)
    if top_level is not None:
        _check_top_level(tree, top_level, origins)
    cfg = _resolve(tree, origins, clock or RunClock.for_run())
    _check_no_missing(cfg, origins)
    leaves = iter_leaves(OmegaConf.to_container(cfg, resolve=False))
    return cfg, {leaf: _nearest_origin(leaf, origins) for leaf, _ in leaves}


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, clock: RunClock | None = None,
                top_level: Collection[str] | None = None) -> DictConfig:
    """Load `path` with its `_base_` files, apply overrides, resolve every interpolation; `_base_` removed."""
    cfg, _ = load_config_with_origins(path, overrides, clock=clock, top_level=top_level)
    return cfg
