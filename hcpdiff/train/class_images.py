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

from hcpdiff.data.class_images import plan_class_images, render_class_images
from hcpdiff.lora.attach import adapters_disabled
from hcpdiff.train.preview import kept_random_state

logger = logging.getLogger("hcpdiff.train")


def generate_class_images(data: Mapping[str, Any], parts: Any, accelerator: Any, clip_skip: int = 0) -> None:
    """Fill each class folder up to `generate.num` images with the family's pipeline (the visualizer's, with the
    model's own sampler) over the loaded parts, adapters bypassed: the images are the base model's.

    Every process counts the folder, waits for the others, renders its share (every N-th missing index) and waits
    again, so the data is complete everywhere before any process scans it. The random state is put back and the
    pipeline dropped afterwards: a run that renders trains exactly as one that finds its images in place.
    """
    plans = plan_class_images(data)
    for plan in plans:
        if plan.missing:
            logger.info("%s: %d of %d class images in %s; rendering %d (%s, %d steps)", plan.key_path, plan.present,
                        plan.spec.num, plan.folder, len(plan.missing), plan.spec.prompt, plan.spec.steps)
        else:
            logger.info("%s: %d class images in %s, none to render (reused)", plan.key_path, plan.present,
                        plan.folder)
    todo = [plan for plan in plans if plan.missing]
    if not todo:
        return
    family = parts.family  # a text-to-image one: an editing family's datasets need input images, checked before
    accelerator.wait_for_everyone()  # every process has counted before any writes
    from hcpdiff.infer.pipeline import build_pipeline

    started = time.perf_counter()
    pipe = build_pipeline(parts, {})
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
                render_class_images(plan, pipe, family, clip_skip=clip_skip, rank=rank, num_replicas=replicas,
                                    progress=progress.update)
    finally:
        progress.close()
        for module, training in modes:
            module.train(training)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    logger.info("%d class images rendered in %.1f s", sum(len(plan.missing) for plan in todo),
                time.perf_counter() - started)
