"""`_target_` nodes: checked against their callable's signature at load time, built with hydra's instantiate."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from typing import Any, Mapping

from hydra._internal.utils import _locate
from hydra.errors import HydraException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hcpdiff.config.keypaths import did_you_mean, iter_children, join_key
from hcpdiff.errors import ConfigError, HcpError

TARGET_KEY = "_target_"

# Optional packages that configs commonly name (8-bit AdamW, Prodigy, Lion, ...): top-level module -> pip package.
OPTIONAL_PACKAGES = {"bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt", "lion_pytorch": "lion-pytorch",
                     "dadaptation": "dadaptation", "schedulefree": "schedulefree", "came_pytorch": "came-pytorch"}


def _is_special_key(key: Any) -> bool:
    """hydra's own keys (`_target_`, `_partial_`, `_args_`, ...) are not arguments of the target."""
    return isinstance(key, str) and key.startswith("_") and key.endswith("_")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a `raise ... from` chain."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _first_hcp_error(err: BaseException) -> HcpError | None:
    """The first of our own user errors in a `raise ... from` chain, if any."""
    current: BaseException | None = err
    while current is not None and not isinstance(current, HcpError):
        current = current.__cause__
    return current


def _one_line(err: BaseException) -> str:
    """`Type: message` on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def instantiate(node: Any, key_path: str, **kwargs: Any) -> Any:
    """hydra's `instantiate(node, **kwargs)`; any failure is a ConfigError naming `key_path` and the target."""
    target = node.get(TARGET_KEY, "?") if isinstance(node, (Mapping, DictConfig)) else "?"
    try:
        return hydra_instantiate(node, **kwargs)
    except (HydraException, OmegaConfBaseException, ImportError, TypeError, ValueError) as err:
        user_error = _first_hcp_error(err)
        if user_error is not None:  # the target itself refused its input; its message is already for users
            raise user_error from None
        cause = _root_cause(err)
        # hydra names the failing nested node as `full_key: ...`, relative to `node` or absolute.
        match = re.search(r"full_key: (\S+)", str(err))
        where = key_path
        if match and match.group(1) != key_path:
            inner = match.group(1)
            where = inner if inner.startswith(key_path + ".") else join_key(key_path, inner)
        raise ConfigError(f"`{where}`: cannot build '{target}': {_one_line(cause)}.") from err


def _why_unimportable(target: str) -> str:
    """Say which part of a dotted path fails: the module that is missing, or the attribute it lacks."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # this prefix is not a module; try a shorter one
            return f"importing '{module_name}' failed: {_one_line(err)}"
        except Exception as err:
            return f"importing '{module_name}' failed: {_one_line(err)}"
        for depth, attribute in enumerate(parts[split:], start=split):
            if not hasattr(found, attribute):
                return f"'{'.'.join(parts[:depth])}' has no attribute '{attribute}'"
            found = getattr(found, attribute)
        break
    return f"no module named '{parts[0]}'"


def _check_node(node: dict, key_path: str, problems: list[str]) -> None:
    """Append to `problems` what is wrong with one `_target_` mapping."""
    target = node[TARGET_KEY]
    target_key = join_key(key_path, TARGET_KEY)
    if not isinstance(target, str) or not target:
        problems.append(f"`{target_key}`: expected a dotted import path, got {target!r}")
        return
    try:
        target_obj = _locate(target)
    except Exception:  # _locate raises ImportError, but a module's own import may raise anything
        package = OPTIONAL_PACKAGES.get(target.split(".")[0])
        if package is not None and importlib.util.find_spec(target.split(".")[0]) is None:
            problems.append(f"`{target_key}`: '{target}' needs the {package} package, which is not installed; "
                            f"run `pip install {package}`")
        else:
            problems.append(f"`{target_key}`: cannot import '{target}' ({_why_unimportable(target)})")
        return
    try:
        signature = inspect.signature(target_obj)
    except (TypeError, ValueError):  # builtins without a signature cannot be checked
        return
    params = signature.parameters
    if any(param.kind is inspect.Parameter.VAR_KEYWORD for param in params.values()):
        return
    names = [name for name, param in params.items()
             if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    kwargs = {key: value for key, value in node.items() if not _is_special_key(key)}
    unknown = [key for key in kwargs if key not in names]
    for key in unknown:
        problems.append(f"`{join_key(key_path, key)}`: '{target}' has no argument '{key}'"
                        f"{did_you_mean(str(key), names)}")
    if unknown:
        return
    args = node.get("_args_", [])
    try:
        signature.bind_partial(*(args if isinstance(args, list) else [args]), **kwargs)
    except TypeError as err:
        problems.append(f"`{key_path}`: arguments do not fit '{target}' ({err})")


def _walk(node: Any, key_path: str, problems: list[str]) -> None:
    if isinstance(node, dict) and TARGET_KEY in node:
        _check_node(node, key_path, problems)
    for key, child in iter_children(node):
        _walk(child, join_key(key_path, key), problems)


def check_targets(cfg: DictConfig | ListConfig | Mapping[str, Any]) -> None:
    """Check every `_target_` in the tree imports and its keys fit its signature; report all problems at once."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            tree = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"`{getattr(err, 'full_key', '?')}`: {str(err).splitlines()[0]}.") from err
    else:
        tree = cfg
    problems: list[str] = []
    _walk(tree, "", problems)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
