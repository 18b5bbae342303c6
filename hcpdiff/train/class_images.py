"""The set-up step of prior preservation: render every `data.<name>.generate` folder's missing class images with the
base model, before the datasets scan their folders."""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from hcpdiff.data.class_images import ClassImagePlan, plan_class_images, render_class_images
from hcpdiff.errors import ConfigError
from hcpdiff.lora.attach import adapters_disabled
from hcpdiff.train.preview import kept_random_state

logger = logging.getLogger("hcpdiff.train")


def generate_class_images(data: Mapping[str, Any], parts: Any, accelerator: Any, clip_skip: int = 0,
                          cannot_render: str | None = None) -> None:
    """Fill each class folder up to `generate.num` images with the family's pipeline (the visualizer's, with the
    model's own sampler) over the loaded parts, adapters bypassed: the images are the base model's.

    Every process counts the folder, waits for the others, renders its share (every N-th missing index) and waits
    again, so the data is complete everywhere before any process scans it. The random state is put back and the
    pipeline dropped afterwards: a run that renders trains exactly as one that finds its images in place.
    `cannot_render`: why this run cannot render (one ConfigError naming the key when images are missing).
    """
    plans = plan_class_images(data)
    short = next((plan for plan in plans if plan.missing), None)
    if short is not None and cannot_render:
        raise ConfigError(f"{short.key_path}: {len(short.missing)} class images to render in {short.folder}, which "
                          f"{cannot_render}; render them in a run without it (they are reused), or fill the folder")
    for plan in plans:
        if plan.missing:
            logger.info("%s: %d of %d class images in %s; rendering %d (%s, %d steps)", plan.key_path, plan.present,
                        plan.spec.num, plan.folder, len(plan.missing), plan.spec.prompt, plan.spec.steps)
        else:
            logger.info("%s: %d class images in %s, none to render (reused)", plan.key_path, plan.present,
                        plan.folder)
    todo = [plan for plan in plans if plan.missing]
    if not plans:
        return
    # The barriers depend on the config alone, never on what one process found: no process can wait for another
    # that went on (a folder some process does not see is the user's error, not a hang).
    accelerator.wait_for_everyone()  # every process has counted before any writes
    if todo:
        _render(todo, parts, accelerator, clip_skip)
    accelerator.wait_for_everyone()  # every image is written before any process scans the folder


def _render(todo: list[ClassImagePlan], parts: Any, accelerator: Any, clip_skip: int) -> None:
    """This process's share of every plan, with the family's pipeline over the loaded parts (adapters bypassed, eval
    mode, the random state and train modes put back, the pipeline dropped after)."""
    from hcpdiff.infer.pipeline import build_pipeline

    started = time.perf_counter()
    pipe = build_pipeline(parts, {})  # a text-to-image family: an editing family's datasets need input images
    pipe.set_progress_bar_config(disable=True)
    modules = [module for module in parts.components.values() if isinstance(module, torch.nn.Module)]
    modes = [(module, module.training) for module in modules]
    rank, replicas = accelerator.process_index, accelerator.num_processes
    total = sum(len(plan.missing[rank::replicas]) for plan in todo)
    progress = tqdm(total=total, desc="class images", disable=not accelerator.is_main_process, dynamic_ncols=True)
    try:
        for module in modules:
            module.eval()
        with kept_random_state(), adapters_disabled(modules), torch.no_grad(), accelerator.autocast():
            for plan in todo:
                render_class_images(plan, pipe, parts.family, clip_skip=clip_skip, rank=rank, num_replicas=replicas,
                                    progress=progress.update)
    finally:
        progress.close()
        for module, training in modes:
            module.train(training)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("%d class images rendered in %.1f s (this process: %d)", sum(len(plan.missing) for plan in todo),
                time.perf_counter() - started, total)
