"""Reading a config mapping into a dataclass by field name: typos and missing keys are errors."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal, Mapping, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hcpdiff.config.keypaths import did_you_mean, join_key
from hcpdiff.errors import ConfigError

SpecT = TypeVar("SpecT")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A per-field value constraint for `read_fields`, written in the annotation: `Annotated[int, Bound(ge=1)]`.

    None always passes (whether None is allowed is the type's business); NaN fails every bound; `note` says what
    a boundary value means ("0 or null: off").
    """

    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    lt: float | None = None  # value < lt
    finite: bool = False  # refuse inf and NaN
    note: str = ""

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks this bound, or None."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        wanted = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                  f"< {self.lt:g}" if self.lt is not None else "", "finite" if self.finite else ""]
        broken = (math.isnan(value)
                  or (self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                  or (self.lt is not None and not value < self.lt) or (self.finite and not math.isfinite(value)))
        if not broken:
            return None
        note = f" ({self.note})" if self.note else ""
        return f"must be {' and '.join(part for part in wanted if part)}{note}, got {value!r}"


def _split_annotated(annotation: Any) -> tuple[Any, list[Bound]]:
    """(the plain type, its Bound constraints) of a possibly `Annotated[...]` field type."""
    if typing.get_origin(annotation) is Annotated:
        plain, *extras = typing.get_args(annotation)
        return plain, [extra for extra in extras if isinstance(extra, Bound)]
    return annotation, []


def _fits(value: Any, annotation: Any) -> bool:
    """A light check that `value` suits `annotation`; unknown annotations accept anything."""
    if annotation is Any or annotation is object:
        return True
    if annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if annotation is list or origin is list:
        return isinstance(value, list) and (not args or all(_fits(item, args[0]) for item in value))
    if annotation is tuple or origin is tuple:
        return isinstance(value, (list, tuple))
    if annotation is dict or origin is dict:
        return isinstance(value, dict) and (len(args) != 2 or all(_fits(item, args[1]) for item in value.values()))
    return True


def _coerce(value: Any, annotation: Any) -> Any:
    """Give a plain `float` field a float when the YAML wrote an int (`lr: 1`), and tuples as tuples."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(options) == 1:
        annotation = options[0]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (annotation is tuple or typing.get_origin(annotation) is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _type_name(annotation: Any) -> str:
    """How a field type reads in an error: `int`, `one of 'no', 'fp16' or null`, ..."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else ()
    literals = [arg for arg in options if typing.get_origin(arg) is Literal]
    if typing.get_origin(annotation) is Literal or (literals and len(literals) == len(options) - 1):
        values = typing.get_args(annotation if not literals else literals[0])
        tail = " or null" if literals else ""
        return "one of " + ", ".join(repr(value) for value in values) + tail
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _as_plain_mapping(node: Any, key_path: str, names: list[str]) -> Mapping[str, Any]:
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"`{key_path}`: {str(err).splitlines()[0]}.") from err
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"`{key_path}`: expected a mapping with keys {', '.join(names)}, "
                          f"got {type(node).__name__} {node!r}.")
    return node


def read_fields(node: Any, key_path: str, spec_cls: type[SpecT]) -> SpecT:
    """Build `spec_cls` (a dataclass) from a mapping; unknown, missing or mistyped keys are one ConfigError."""
    if not dataclasses.is_dataclass(spec_cls):
        raise TypeError(f"read_fields needs a dataclass, got {spec_cls!r}")
    fields = [field for field in dataclasses.fields(spec_cls) if field.init]
    names = [field.name for field in fields]
    mapping = _as_plain_mapping(node, key_path, names)
    try:
        hints = typing.get_type_hints(spec_cls, include_extras=True)
    except Exception:  # an unresolvable annotation only costs us the type check
        hints = {}

    problems: list[str] = []
    for key in mapping:
        if key not in names:
            problems.append(f"`{join_key(key_path, key)}`: unknown key{did_you_mean(str(key), names)}; "
                            f"known keys: {', '.join(names)}")
    values: dict[str, Any] = {}
    for field in fields:
        path = join_key(key_path, field.name)
        if field.name not in mapping:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"`{path}`: required key is missing")
            continue
        value, (annotation, bounds) = mapping[field.name], _split_annotated(hints.get(field.name, Any))
        if not _fits(value, annotation):
            problems.append(f"`{path}`: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
            continue
        broken = [problem for bound in bounds if (problem := bound.problem(value)) is not None]
        if broken:
            problems.append(f"`{path}`: {'; '.join(broken)}")
            continue
        values[field.name] = _coerce(value, annotation)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    return spec_cls(**values)
