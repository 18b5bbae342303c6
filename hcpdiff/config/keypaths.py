"""Dotted key paths over plain config trees (dicts and lists): `lora_unet.0.lr`."""
from __future__ import annotations

import difflib
from typing import Any, Iterator


def join_key(prefix: str, key: Any) -> str:
    """`prefix.key`, or just `key` at the top level."""
    return f"{prefix}.{key}" if prefix else str(key)


def iter_children(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of a dict or list; nothing for a scalar."""
    if isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, list):
        yield from enumerate(node)


def iter_leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; an empty dict or list counts as a leaf."""
    if isinstance(node, (dict, list)) and node:
        for key, child in iter_children(node):
            yield from iter_leaves(child, join_key(prefix, key))
    elif prefix:
        yield prefix, node


def all_key_paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted path in the tree, inner mappings and lists included."""
    paths: list[str] = []
    for key, child in iter_children(node):
        path = join_key(prefix, key)
        paths.append(path)
        paths.extend(all_key_paths(child, path))
    return paths


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate most like `word` (difflib), or None when nothing is close."""
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest candidate, or an empty string."""
    match = closest(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""
