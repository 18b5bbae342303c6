"""Pick the Linear / Conv2d layers a LoRA group adapts, from `re:` patterns and exact dotted names."""
from __future__ import annotations

import difflib
import re

from torch import nn

from hcpdiff.errors import ConfigError

ADAPTABLE = (nn.Linear, nn.Conv2d)
REGEX_PREFIX = "re:"


def select_layers(model: nn.Module, patterns: list[str], where: str) -> list[str]:
    """Dotted names of the adaptable leaves matched by `patterns`, in model order; `where` names the config key."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for pattern in patterns:
        matched = match_modules(modules, pattern, where)
        if not matched:
            suggestions = ", ".join(close_names(modules, pattern))
            raise ConfigError(f"{where}: pattern '{pattern}' matches no module; close real names: {suggestions}.")
        leaves = [leaf for name in matched for leaf in adaptable_leaves(modules[name], name)]
        if not leaves:
            raise ConfigError(
                f"{where}: pattern '{pattern}' matches {', '.join(matched[:3])}{' ...' if len(matched) > 3 else ''}, "
                "which neither is nor contains a Linear or Conv2d layer."
            )
        chosen.update(leaves)
    # a pattern may name a layer nested inside another chosen layer (`re:.*`); adapt the outer one only
    return [name for name in modules if name in chosen and not has_chosen_ancestor(name, chosen)]


def has_chosen_ancestor(name: str, chosen: set[str]) -> bool:
    """True when a dotted prefix of `name` (or the root) is itself chosen."""
    if not name:
        return False
    parts = name.split(".")
    return any(".".join(parts[:i]) in chosen for i in range(len(parts)))


def match_modules(modules: dict[str, nn.Module], pattern: str, where: str) -> list[str]:
    """Names that `pattern` selects: `re:` full-matches the dotted name, anything else is one exact name."""
    if not pattern.startswith(REGEX_PREFIX):
        return [pattern] if pattern in modules else []
    regex = compile_pattern(pattern, where)
    return [name for name in modules if regex.fullmatch(name)]


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    """The regular expression of a `re:` pattern; an invalid one is a config error naming `where`."""
    try:
        return re.compile(pattern[len(REGEX_PREFIX):])
    except re.error as err:
        raise ConfigError(f"{where}: pattern '{pattern}' is not a valid regular expression ({err}).") from err


def pattern_selects(pattern: str, layer: str, where: str = "layers") -> bool:
    """Whether `pattern` selects `layer` as `select_layers` does: the pattern names the layer itself or a module
    containing it (`re:` full-matching the dotted name, a plain name equal to it, `""` the whole model).

    For filters over saved weights (the visualizer's `layers:` on a LoRA file), where no model is at hand.
    """
    parts = layer.split(".")
    names = ["", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))]  # the root, each parent, the layer
    if pattern.startswith(REGEX_PREFIX):
        regex = compile_pattern(pattern, where)
        return any(regex.fullmatch(name) for name in names)
    return pattern in names


def adaptable_leaves(module: nn.Module, name: str) -> list[str]:
    """`name` itself if it is a Linear / Conv2d, else the outermost Linear / Conv2d layers inside it."""
    if isinstance(module, ADAPTABLE):
        return [name]
    leaves: list[str] = []
    for child_name, child in module.named_children():
        leaves += adaptable_leaves(child, f"{name}.{child_name}" if name else child_name)
    return leaves


def close_names(modules: dict[str, nn.Module], pattern: str, count: int = 5) -> list[str]:
    """Up to `count` real module names that look most like the pattern (compared on every dotted suffix)."""
    wanted = literal_text(pattern)

    def score(name: str) -> float:
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        return max(difflib.SequenceMatcher(None, wanted, suffix).ratio() for suffix in suffixes)

    named = [name for name in modules if name]
    return sorted(named, key=score, reverse=True)[:count]


def literal_text(pattern: str) -> str:
    """The plain text of a pattern with regex syntax removed (`re:.*\\.to_kk$` -> `to_kk`)."""
    if not pattern.startswith(REGEX_PREFIX):
        return pattern
    text = re.sub(r"\.[*+?]|[\^$()\[\]{}|*+?]", "", pattern[len(REGEX_PREFIX) :])
    return re.sub(r"\\(.)", r"\1", text).strip(".")
