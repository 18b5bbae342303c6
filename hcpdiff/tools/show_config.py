"""Print a config as it will be used: `_base_` merged, overrides applied, interpolations resolved.

    python -m hcpdiff.tools.show_config --cfg cfgs/train/examples/lora_conventional.yaml [a.b=value ...] [--origin]
"""
from __future__ import annotations

from typing import Iterator

import yaml
from omegaconf import OmegaConf

from hcpdiff.cli import cfg_parser, run_cli
from hcpdiff.config import load_config_with_origins
from hcpdiff.config.keypaths import join_key


def _leaf_lines(node: yaml.Node, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(dotted key path, 0-based line where its value ends) for every leaf of a composed YAML document."""
    if isinstance(node, yaml.MappingNode) and node.value:
        for key_node, value_node in node.value:
            yield from _leaf_lines(value_node, join_key(prefix, key_node.value))
    elif isinstance(node, yaml.SequenceNode) and node.value:
        for index, item_node in enumerate(node.value):
            yield from _leaf_lines(item_node, join_key(prefix, index))
    else:
        line = node.end_mark.line
        # a value that ends at the start of a line really ended on the line before
        if node.end_mark.column == 0 and line > node.start_mark.line:
            line -= 1
        yield prefix, line


def annotate_origins(text: str, origins: dict[str, str]) -> str:
    """Append `# <origin>` to the line of each leaf in a YAML dump of the config."""
    lines = text.splitlines()
    document = yaml.compose(text, Loader=yaml.SafeLoader)
    annotated: set[int] = set()
    for path, line in _leaf_lines(document) if document is not None else ():
        if line not in annotated and path in origins:
            lines[line] += f"  # {origins[path]}"
            annotated.add(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Load the config given by `--cfg` and the overrides, and print it as YAML."""
    parser = cfg_parser("python -m hcpdiff.tools.show_config", __doc__.splitlines()[0])
    parser.add_argument("--origin", action="store_true", help="show which file (or the command line) set each key")
    args = parser.parse_intermixed_args(argv)
    cfg, origins = load_config_with_origins(args.cfg, args.overrides)
    text = OmegaConf.to_yaml(cfg)
    print(annotate_origins(text, origins) if args.origin else text, end="")
    return 0


if __name__ == "__main__":
    run_cli(main)
