"""Reading YAML the way users expect: `2e-5` is a float, dates stay strings, duplicate keys are errors."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hcpdiff.errors import ConfigError

# YAML 1.1 (PyYAML) only calls `1.0e-3` a float; configs write `2e-5` and `1e-3`, so also accept
# exponent forms without a dot (the same pattern OmegaConf's own loader adds).
_FLOAT_PATTERN = re.compile(
    r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
       |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
       |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
       |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
       |[-+]?\.(?:inf|Inf|INF)
       |\.(?:nan|NaN|NAN))$""",
    re.X,
)


# Aliases let a few lines describe an enormous tree ("billion laughs": 5.5 GB, then MemoryError, once OmegaConf
# copies it) or a tree that contains itself (`a: &a [*a]`: RecursionError). A real config expands to a few hundred
# nodes; this bound is far above any of them and far below harm.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in `node`'s tree with every alias expanded; a ComposerError for a cycle or a tree past the bound."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it (a recursive "
                                          "structure)", node.start_mark)
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_EXPANDED_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"its aliases expand to more than {MAX_EXPANDED_NODES} values (an alias bomb?)",
                node.start_mark)
    open_nodes.discard(key)
    sizes[key] = size
    return size


class BoundedAliasComposer(yaml.composer.Composer):
    """A composer that refuses documents whose aliases expand past MAX_EXPANDED_NODES or into a cycle."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:  # before construction: nothing large or cyclic is ever built
            _expanded_size(node, {}, set())
        return node


class SafeBoundedLoader(yaml.SafeLoader, BoundedAliasComposer):
    """PyYAML's SafeLoader with bounded aliases: for data files (captions) read with the standard YAML types."""


def safe_load_bounded(text: str) -> Any:
    """`yaml.safe_load(text)` with aliases bounded (see MAX_EXPANDED_NODES)."""
    return yaml.load(text, Loader=SafeBoundedLoader)


class ConfigYamlLoader(SafeBoundedLoader):
    """SafeLoader with bounded aliases, scientific-notation floats, no timestamps, and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))
# Timestamps would become datetime objects, which OmegaConf cannot hold; `2024-01-01` stays a string.
ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in ConfigYamlLoader.yaml_implicit_resolvers.items()
}


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line describing a YAML error, with its 1-based line number when known."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_yaml_file(path: Path, shown_as: str) -> Any:
    """Parse one YAML file; a parse error is a ConfigError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file '{shown_as}': {err.strerror or err}.") from err
    try:
        return yaml.load(text, Loader=ConfigYamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown_as} {_yaml_problem(err)} (not valid YAML).") from err


def parse_yaml_value(text: str, where: str) -> Any:
    """Parse a command-line value as YAML (`2e-4` -> 0.0002, `null` -> None, `[a, b]` -> list)."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=ConfigYamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: value {text!r} is not valid YAML ({_yaml_problem(err)}).") from err
