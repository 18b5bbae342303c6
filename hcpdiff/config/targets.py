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

# A config must not be able to call whatever Python it names (hydra's own blocklist misses `builtins.open`,
# `torch.load`, ...). A target is looked at only when its module is under one of these roots, so nothing else is
# even imported; what it may then be is decided by `_refusal`.
TRUSTED_ROOTS = ("hcpdiff", "diffusers", "transformers", "torch.optim", *OPTIONAL_PACKAGES)
# Roots whose every callable may be a target (the project's own buckets, sources, ...).
PROJECT_ROOTS = ("hcpdiff",)
# Loaders a component class may be built through; the class itself must pass `_is_component_class`.
COMPONENT_LOADERS = ("from_pretrained", "from_single_file", "from_config")
# Arguments that would run code shipped with a model folder or the hub.
CODE_RUNNING_ARGS = ("trust_remote_code", "custom_pipeline")
ALLOWED_TARGETS_HINT = ("a `_target_` may be anything in hcpdiff, an optimizer or lr scheduler class (torch.optim, "
                        f"{', '.join(OPTIONAL_PACKAGES)}), or a diffusers / transformers model, scheduler, tokenizer, "
                        f"processor or pipeline class or its {' / '.join(COMPONENT_LOADERS)}")


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
    # Checked here too, not only by check_targets: a caller may build a node no config check has seen.
    try:
        tree = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    except OmegaConfBaseException as err:
        raise ConfigError(f"`{key_path}`: {str(err).splitlines()[0]}.") from err
    problems: list[str] = []
    _policy_problems(tree, key_path, problems)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
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


def _under(name: str, roots: tuple[str, ...]) -> bool:
    """True when the dotted `name` is one of `roots` or inside one of them."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def _component_bases() -> tuple[type, ...]:
    """The library base classes a buildable component derives from (imported on first use: they are heavy)."""
    import diffusers
    import torch
    import transformers

    return (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
            diffusers.ModelMixin, diffusers.SchedulerMixin, diffusers.DiffusionPipeline,
            transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.ProcessorMixin,
            transformers.ImageProcessingMixin, transformers.FeatureExtractionMixin, transformers.PretrainedConfig)


def _is_component_class(obj: Any) -> bool:
    """A class that is an optimizer, lr scheduler, or a diffusers / transformers model, scheduler, tokenizer, ..."""
    if not inspect.isclass(obj):
        return False
    # AutoModel / AutoTokenizer / AutoPipeline... derive from none of the bases; they only dispatch to classes that do.
    if _under(obj.__module__, ("transformers.models.auto", "diffusers.pipelines.auto_pipeline",
                               "diffusers.models.auto_model")):
        return True
    return issubclass(obj, _component_bases())


def _may_build(target: str, target_obj: Any) -> bool:
    """True when a located target is something a config may call (see TRUSTED_ROOTS)."""
    if _under(target, PROJECT_ROOTS) or _is_component_class(target_obj):
        return True
    owner = getattr(target_obj, "__self__", None)  # a bound classmethod: `AutoencoderKL.from_pretrained`
    return target.rpartition(".")[2] in COMPONENT_LOADERS and _is_component_class(owner)


def target_problem(node: Mapping, key_path: str) -> tuple[str | None, Any]:
    """(What makes this `_target_` mapping unsafe or unimportable, or None; the located target when it was)."""
    target = node[TARGET_KEY]
    target_key = join_key(key_path, TARGET_KEY)
    if not isinstance(target, str) or not target:
        return f"`{target_key}`: expected a dotted import path, got {target!r}", None
    if not _under(target, TRUSTED_ROOTS + PROJECT_ROOTS):
        return f"`{target_key}`: '{target}' is not allowed ({ALLOWED_TARGETS_HINT})", None
    for arg in CODE_RUNNING_ARGS:
        if node.get(arg):
            return (f"`{join_key(key_path, arg)}`: '{arg}' would run code from the model folder or hub; "
                    f"it is not allowed in a config"), None
    try:
        target_obj = _locate(target)
    except Exception:  # _locate raises ImportError, but a module's own import may raise anything
        package = OPTIONAL_PACKAGES.get(target.split(".")[0])
        if package is not None and importlib.util.find_spec(target.split(".")[0]) is None:
            return (f"`{target_key}`: '{target}' needs the {package} package, which is not installed; "
                    f"run `pip install {package}`"), None
        return f"`{target_key}`: cannot import '{target}' ({_why_unimportable(target)})", None
    if not _may_build(target, target_obj):
        return f"`{target_key}`: '{target}' is not allowed ({ALLOWED_TARGETS_HINT})", None
    return None, target_obj


def _policy_problems(node: Any, key_path: str, problems: list[str]) -> None:
    """Append the target problems of every `_target_` mapping in a plain tree (no signature checks)."""
    if isinstance(node, Mapping) and TARGET_KEY in node:
        problem, _ = target_problem(node, key_path)
        if problem is not None:
            problems.append(problem)
    for key, child in iter_children(node):
        _policy_problems(child, join_key(key_path, key), problems)


def _check_node(node: dict, key_path: str, problems: list[str]) -> None:
    """Append to `problems` what is wrong with one `_target_` mapping."""
    target = node[TARGET_KEY]
    problem, target_obj = target_problem(node, key_path)
    if problem is not None:
        problems.append(problem)
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
