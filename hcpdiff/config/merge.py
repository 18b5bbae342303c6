"""Merging plain config trees: mappings key by key, lists and scalars replaced, `_delete_: true` replaces."""
from __future__ import annotations

import copy
from typing import Any

from hcpdiff.config.keypaths import iter_leaves, join_key

DELETE_KEY = "_delete_"

# dotted leaf path -> the file (or "command line") that last set it
Origins = dict[str, str]


def strip_delete_markers(node: Any) -> Any:
    """A deep copy of `node` without any `_delete_` keys."""
    if isinstance(node, dict):
        return {key: strip_delete_markers(value) for key, value in node.items() if key != DELETE_KEY}
    if isinstance(node, list):
        return [strip_delete_markers(value) for value in node]
    return copy.deepcopy(node)


def drop_origins(origins: Origins, path: str) -> None:
    """Forget the origins of `path` and everything under it."""
    if not path:
        origins.clear()
        return
    below = path + "."
    for key in [key for key in origins if key == path or key.startswith(below)]:
        del origins[key]


def set_value_origins(origins: Origins, path: str, value: Any, origin: str | Origins) -> None:
    """Record the origin of every leaf of `value` placed at `path` (replacing what was there).

    `origin` is one name for all leaves, or the origins of a merged base tree (same key paths).
    """
    drop_origins(origins, path)
    for leaf_path, _ in iter_leaves(value, path):
        origins[leaf_path] = origin if isinstance(origin, str) else origin.get(leaf_path, "?")


def merge_layer(base: Any, layer: Any, origin: str | Origins, origins: Origins, prefix: str = "") -> Any:
    """Return `layer` merged over `base`, recording in `origins` where the leaves of `layer` came from."""
    if isinstance(base, dict) and isinstance(layer, dict) and layer.get(DELETE_KEY) is not True:
        merged = dict(base)
        for key, value in layer.items():
            if key == DELETE_KEY:
                continue
            path = join_key(prefix, key)
            if key in merged:
                merged[key] = merge_layer(merged[key], value, origin, origins, path)
            else:
                merged[key] = strip_delete_markers(value)
                set_value_origins(origins, path, merged[key], origin)
        return merged
    replaced = strip_delete_markers(layer)
    set_value_origins(origins, prefix, replaced, origin)
    return replaced
