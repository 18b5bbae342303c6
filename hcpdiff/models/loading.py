"""Load a Stable Diffusion base model's parts from a local diffusers folder or the Hugging Face hub."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families import FAMILIES, Family, detect_family, family_named, folder_config_reader, hub_config_reader
from hcpdiff.families.base import Expert
from hcpdiff.models.hub import cached_snapshot, hub_reachable, offline_mode
from hcpdiff.models.parts import ModelParts

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*")


def looks_like_path(name_or_path: str) -> bool:
    """True when the string can only be meant as a file-system path, never as a hub id."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
        or name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)
        or not HUB_ID.fullmatch(name_or_path)
    )


def sibling_key(where: str, name: str) -> str:
    """The config key `name` beside the key `where` (model.pretrained_model_name_or_path -> model.<name>)."""
    return where.rsplit(".", 1)[0] + "." + name if "." in where else name


def check_model_folder(folder: Path, where: str, shown: str, drop_t5: bool = False) -> Family:
    """The family of a local diffusers folder, after checking it has every part folder the family needs (a T5
    left out with `drop_t5` need not be there)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
    read_config = folder_config_reader(folder)
    family = next((f for f in FAMILIES if f.matches(index, read_config)), None)
    if family is None:  # no family recognised: name what the closest one misses
        family = min(FAMILIES, key=lambda f: sum(not (folder / p).is_dir() for p in f.required_folders))
    dropped = family.t5_parts if drop_t5 else ()
    missing = [part for part in family.required_folders if part not in dropped and not (folder / part).is_dir()]
    if missing:
        raise ModelError(
            f"{where}: the model folder '{shown}' has no {', '.join(p + '/' for p in missing)} (expected a diffusers "
            f"{family.description} folder with {', '.join(p + '/' for p in family.required_folders)})."
        )
    return family


@contextmanager
def transformers_progress_off() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar for the duration, then restore the user's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_parts(source: str, family: Family, *, revision: str | None, local_files_only: bool, where: str,
               shown: str, skip: tuple[str, ...] = (), expert: str | None = None,
               expert_key: str | None = None) -> dict[str, Any]:
    """Load every part with its library's from_pretrained (parts in `skip` are None); a failure names the part and
    the model. A model with denoising experts (Family.experts) loads them all, each in its own folder's place; with
    `expert_key` (training) it loads only the one `expert` names, in the denoiser's place (see choose_expert)."""
    from diffusers import DDPMScheduler  # any scheduler class reads scheduler_config.json

    common = {"revision": revision, "local_files_only": local_files_only}
    settings = pipeline_settings(source, common)
    loaders = family.part_loaders(source, common)
    chosen = choose_expert(family.experts(settings), expert, expert_key, family, shown) if expert_key else None
    unloaded: dict[str, Any] = {}
    if chosen is not None:  # the others are not loaded for training; a render loads them (render_components)
        unloaded = {other.folder: loaders.pop(other.folder) for other in family.experts(settings) if other != chosen}
        loaders[family.denoiser] = loaders.pop(chosen.folder)
    components: dict[str, Any] = {}
    for part, load in loaders.items():
        if part in skip:
            components[part] = None
            continue
        try:
            with transformers_progress_off():
                components[part] = load()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{where}: cannot load the {part} of '{shown}': {err}") from err
    try:
        scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:
        raise ModelError(f"{where}: cannot load the scheduler of '{shown}': {err}") from err
    return {"components": components, "noise_scheduler": family.training_scheduler(scheduler_config),
            "pipeline_settings": settings, "expert": chosen, "expert_loaders": unloaded}


def choose_expert(experts: tuple[Expert, ...], expert: str | None, key: str, family: Family,
                  shown: str) -> Expert | None:
    """The expert `expert` (the config's `key`) names among a model's; a model with experts needs one named, and a
    model without any refuses the key (one ConfigError each)."""
    if not experts:
        if expert is None:
            return None
        raise ConfigError(f"{key}: '{shown}' is a {family.description} model with one {family.denoiser}, not "
                          f"several denoising experts; remove {key}")
    chosen = next((candidate for candidate in experts if candidate.name == expert), None)
    if chosen is None:
        ranges = " or ".join(f"{e.name} ({e.folder}, sigmas {e.sigma_min:g} to {e.sigma_max:g})" for e in experts)
        told = "is not set" if expert is None else f"{expert!r} is not an expert of it"
        raise ConfigError(f"{key}: '{shown}' has {len(experts)} denoising experts, trained one at a time, and {key} "
                          f"{told}; set {key} to {ranges}")
    return chosen


def peek_expert(name_or_path: str, family: Family, expert: str | None, key: str) -> None:
    """Check `key` (choose_expert) against a local model folder's model_index.json before anything loads."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        settings = pipeline_settings(str(local), {"local_files_only": True})
        choose_expert(family.experts(settings), expert, key, family, name_or_path)


def pipeline_settings(source: str, common: dict[str, Any]) -> dict[str, Any]:
    """model_index.json's entries that are settings of the pipeline, not parts ([library, class] pairs) nor `_` keys;
    empty without a model_index.json."""
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(source, **common))
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in index.items()
            if not key.startswith("_") and not (isinstance(value, (list, tuple)) and len(value) == 2)}


def load_model_parts(
    name_or_path: str, *, revision: str | None = None, where: str = "model.pretrained_model_name_or_path",
    single_file_config: str | None = None, drop_t5: bool = False, expert: str | None = None,
    expert_key: str | None = None,
) -> ModelParts:
    """Load a base model (fp32) of any registered family from a local diffusers folder, a hub id or one checkpoint file.

    `single_file_config` is the diffusers folder (or cached hub id) whose configs describe a single checkpoint file.
    `drop_t5` leaves a T5 encoder the family can run without unloaded (None in the components). With `expert_key`
    (training: the config key naming it) a model with denoising experts loads only the one `expert` names, as its
    denoiser; without, all of them.
    """
    local = Path(os.path.expanduser(name_or_path))
    drop_key = sibling_key(where, "drop_t5")
    if local.is_dir():
        family = check_model_folder(local, where, name_or_path, drop_t5)
        parts = load_parts(str(local), family, revision=None, local_files_only=True, where=where, shown=name_or_path,
                           skip=family.dropped_parts(drop_t5, drop_key), expert=expert, expert_key=expert_key)
    elif local.is_file():
        family, parts = load_single_file_parts(local, single_file_config, where=where, shown=name_or_path,
                                               drop_t5=drop_t5)
        if expert_key:  # a single file is one denoiser
            choose_expert((), expert, expert_key, family, name_or_path)
    elif looks_like_path(name_or_path):
        raise ModelError(f"{where}: '{name_or_path}' was not found (expected a diffusers model folder or a hub id).")
    else:
        family, parts = load_hub_parts(name_or_path, revision=revision, where=where, drop_t5=drop_t5, expert=expert,
                                       expert_key=expert_key)
    return ModelParts(family=family, **parts, name_or_path=name_or_path)


def peek_model(name_or_path: str, *, single_file_config: str | None = None,
               where: str = "model.pretrained_model_name_or_path", drop_t5: bool = False) -> tuple[Family, Any] | None:
    """(family, training noise scheduler) of a local model read from its configs alone, no weights, so the run's
    settings can be checked against the family before anything loads. None when that takes the hub or a file's
    header (a hub id, a single file without a local config folder): those are checked once loaded."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        folder, family = local, check_model_folder(local, where, name_or_path, drop_t5)
    elif local.is_file() and single_file_config and Path(os.path.expanduser(single_file_config)).is_dir():
        folder = Path(os.path.expanduser(single_file_config))
        family = check_model_folder(folder, sibling_key(where, "single_file_config"), single_file_config, drop_t5)
    else:
        return None
    scheduler_config = folder_config_reader(folder)("scheduler")
    if scheduler_config is None:
        return None  # the loader names the missing scheduler
    return family, family.training_scheduler(scheduler_config)


def original_layout_family(path: Path) -> Family | None:
    """The family whose original-layout key marker a `.safetensors` file's keys show (FLUX's `double_blocks.`), if any;
    only the header is read."""
    markers = {family.single_file_marker: family for family in FAMILIES if family.single_file_marker}
    if not markers or path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is named by the loader that reads it next
        return None
    return next((family for marker, family in markers.items() if any(marker in key for key in keys)), None)


def single_file_config_folder(single_file_config: str | None, where: str, shown: str,
                              path: Path | None = None, drop_t5: bool = False) -> tuple[str | None, Family]:
    """The local folder giving a single file's configs; None lets diffusers fetch them (only when the hub is reachable).
    With `drop_t5` the folder need not hold the T5 parts."""
    config_key = sibling_key(where, "single_file_config")
    if single_file_config is None:
        family = original_layout_family(path) if path is not None else None
        if family is not None:  # diffusers alone would read it as SD and fail on the first missing key
            raise ModelError(
                f"{where}: '{shown}' is a {family.description} {family.denoiser} in its original single-file layout; "
                f"set {config_key} to a local diffusers {family.description} folder, whose configs describe the file "
                f"and whose other parts ({', '.join(p for p in family.required_folders if p != family.denoiser)}) "
                "are loaded from there."
            )
        if offline_mode() or not hub_reachable():
            raise ModelError(
                f"{where}: '{shown}' is a single checkpoint file, whose part configs come from a diffusers model of the "
                f"same family; set {config_key} to a local diffusers folder (e.g. the base model it was trained "
                "from), since the hub cannot be reached from this machine to fetch them."
            )
        return None, family_named("sd")  # without a config folder diffusers reads the file as SD 1.x / 2.x
    folder = Path(os.path.expanduser(single_file_config))
    if not folder.is_dir():
        snapshot = None if looks_like_path(single_file_config) else cached_snapshot(single_file_config, None)
        if snapshot is None:
            raise ModelError(
                f"{config_key}: '{single_file_config}' is not a local diffusers folder nor a hub id in the local cache."
            )
        folder = snapshot
    return str(folder), check_model_folder(folder, config_key, single_file_config, drop_t5)


def load_single_file_parts(path: Path, single_file_config: str | None, *, where: str, shown: str,
                           drop_t5: bool = False) -> tuple[Family, dict[str, Any]]:
    """Load an original-layout (CompVis / a1111, Black Forest Labs' FLUX or Stability's SD3 transformer) checkpoint with
    diffusers' from_single_file; the config folder's family says how to read the file."""
    config, family = single_file_config_folder(single_file_config, where, shown, path, drop_t5)
    dropped = family.dropped_parts(drop_t5, sibling_key(where, "drop_t5"))
    options = {"config": config, "local_files_only": True} if config else {}
    if dropped:  # only a family with an optional T5 gets here (dropped_parts refuses the others): leave it unread
        options["skip"] = dropped
    try:
        with transformers_progress_off():
            components = family.load_single_file(str(path), options)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise ModelError(f"{where}: cannot load the single checkpoint file '{shown}': {err}") from err
    scheduler = components.pop("scheduler")
    components.update(dict.fromkeys(dropped))
    return family, {"components": components, "noise_scheduler": family.training_scheduler(dict(scheduler.config))}


def load_hub_parts(repo_id: str, *, revision: str | None, where: str, drop_t5: bool = False,
                   expert: str | None = None, expert_key: str | None = None) -> tuple[Family, dict[str, Any]]:
    """Load from the local hub cache, else download - but only after one quick check that the hub is reachable."""
    drop_key = sibling_key(where, "drop_t5")
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None:
        family = check_model_folder(snapshot, where, repo_id, drop_t5)
        return family, load_parts(str(snapshot), family, revision=None, local_files_only=True, where=where,
                                  shown=repo_id, skip=family.dropped_parts(drop_t5, drop_key), expert=expert,
                                  expert_key=expert_key)
    if offline_mode():
        raise ModelError(
            f"{where}: '{repo_id}' is not a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE=1 forbids downloading it."
        )
    # an unreachable hub otherwise costs ~25 s of retries inside from_pretrained before any error
    if not hub_reachable():
        raise ModelError(
            f"{where}: '{repo_id}' is not a local folder nor in the Hugging Face cache, "
            "and the hub cannot be reached from this machine."
        )
    common = {"revision": revision, "local_files_only": False}
    try:
        from diffusers import DiffusionPipeline

        index = dict(DiffusionPipeline.load_config(repo_id, **common))
    except (OSError, ValueError) as err:
        raise ModelError(f"{where}: cannot read the model_index.json of '{repo_id}': {err}") from err
    family = detect_family(index, hub_config_reader(repo_id, common), repo_id, where)
    return family, load_parts(repo_id, family, revision=revision, local_files_only=False, where=where, shown=repo_id,
                              skip=family.dropped_parts(drop_t5, drop_key), expert=expert, expert_key=expert_key)
