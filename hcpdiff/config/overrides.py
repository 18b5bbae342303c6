"""Command-line overrides: `a.b=value` (key must exist), `+a.b=value` (new key), `++a.b=value`, `~a.b`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from hcpdiff.config.keypaths import all_key_paths, closest
from hcpdiff.config.merge import Origins, drop_origins, set_value_origins
from hcpdiff.config.yaml_io import parse_yaml_value
from hcpdiff.errors import ConfigError

COMMAND_LINE = "command line"

OverrideKind = Literal["set", "add", "force", "delete"]


@dataclass(frozen=True)
class Override:
    """One parsed override: what to do, at which dotted key, with which YAML-parsed value."""

    kind: OverrideKind
    key: str
    value: Any
    text: str


def parse_override(text: str) -> Override:
    """Parse one `key=value`, `+key=value`, `++key=value` or `~key` string."""
    if text.startswith("~"):
        key = text[1:]
        if "=" in key:
            raise ConfigError(f"override '{text}': `~key` removes a key and takes no value; write '~{key.split('=')[0]}'.")
        _check_key(key, text)
        return Override("delete", key, None, text)
    kind: OverrideKind = "force" if text.startswith("++") else "add" if text.startswith("+") else "set"
    body = text.lstrip("+") if kind != "set" else text
    key, sep, raw_value = body.partition("=")
    if not sep:
        raise ConfigError(f"override '{text}' is not of the form key=value (or +key=value, ~key).")
    key = key.strip()
    _check_key(key, text)
    return Override(kind, key, parse_yaml_value(raw_value, f"override '{text}'"), text)


def parse_overrides(texts: Sequence[str]) -> list[Override]:
    """Parse every override string, in order."""
    return [parse_override(text) for text in texts]


def _check_key(key: str, text: str) -> None:
    if not key or any(part == "" for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part; keys look like a.b.c.")


def _child_key(container: Any, part: str) -> Any:
    """The real key (or list index) in `container` written as `part`, or None when there is none."""
    if isinstance(container, dict):
        return next((key for key in container if str(key) == part), None)
    if isinstance(container, list) and part.isdigit():
        return int(part) if int(part) < len(container) else None
    return None


def _missing_key_error(tree: dict, override: Override) -> ConfigError:
    hint = closest(override.key, all_key_paths(tree))
    suggestion = f" (did you mean '{hint}'?)" if hint else ""
    add_hint = "" if override.kind == "delete" else "; use +key=value to add a new key"
    return ConfigError(f"override '{override.text}': key '{override.key}' does not exist{suggestion}{add_hint}.")


def apply_override(tree: dict, override: Override, origins: Origins) -> None:
    """Apply one override to a plain config tree in place, updating `origins`."""
    parts = override.key.split(".")
    container: Any = tree
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[: depth + 1])
        key = _child_key(container, part)
        if key is None:
            if override.kind in ("add", "force") and isinstance(container, dict):
                container[part] = {}
                key = part
            else:
                raise _missing_key_error(tree, override)
        if not isinstance(container[key], (dict, list)):
            raise ConfigError(f"override '{override.text}': '{path}' holds a {type(container[key]).__name__}, "
                              f"not a mapping, so it has no key '{parts[depth + 1]}'.")
        container = container[key]

    key = _child_key(container, parts[-1])
    if override.kind == "delete":
        if key is None:
            raise _missing_key_error(tree, override)
        if isinstance(container, list):
            raise ConfigError(f"override '{override.text}': '{override.key}' is a list item; "
                              f"set the whole list instead.")
        del container[key]
        drop_origins(origins, override.key)
        return
    if key is None:
        if override.kind == "set":
            raise _missing_key_error(tree, override)
        if isinstance(container, list):
            raise ConfigError(f"override '{override.text}': cannot add list item '{override.key}'; "
                              f"set the whole list instead.")
        key = parts[-1]
    elif override.kind == "add":
        raise ConfigError(f"override '{override.text}': key '{override.key}' already exists; "
                          f"drop the + to override it ({override.text.lstrip('+')}).")
    container[key] = override.value
    set_value_origins(origins, override.key, override.value, COMMAND_LINE)


def apply_overrides(tree: dict, overrides: Sequence[Override], origins: Origins) -> None:
    """Apply overrides in order to a plain config tree (after all `_base_` merging)."""
    for override in overrides:
        apply_override(tree, override, origins)
