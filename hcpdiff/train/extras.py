"""Optional training features read from the config: loss options, EMA, previews and extra trackers."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from hcpdiff.config import read_fields
from hcpdiff.errors import ConfigProblems
from hcpdiff.objectives.ddpm import PREDICTION_TYPES
from hcpdiff.train.compile import CompileSpec, read_compile_spec
from hcpdiff.train.preview import PreviewSpec
from hcpdiff.train.specs import EmaSpec, LossSpec, ModelSpec, TrainSpec

TRACKERS = ("tensorboard", "wandb")


@dataclass
class ExtraSpecs:
    """The optional features of one run, checked."""

    loss: LossSpec
    ema: EmaSpec | None
    preview: PreviewSpec | None
    log_with: list[str]
    compile: CompileSpec | None = None


def read_extra_specs(cfg: Any, train_spec: TrainSpec, model_spec: ModelSpec) -> ExtraSpecs:
    """Read `train.loss`, `model.ema`, `previewer`, `train.log_with` and `train.compile`; every problem in one
    ConfigError."""
    problems = ConfigProblems()
    collect = problems.collect
    loss = collect(read_fields, train_spec.loss or {}, "train.loss", LossSpec) or LossSpec()
    if loss.prediction_type is not None and loss.prediction_type not in PREDICTION_TYPES:
        problems.add(f"train.loss.prediction_type: {loss.prediction_type!r} is not one of "
                     f"{', '.join(PREDICTION_TYPES)} (or null for the model's own)")
    if loss.min_snr_gamma is not None and loss.min_snr_gamma <= 0:
        problems.add(f"train.loss.min_snr_gamma: must be > 0 (5 is usual) or null, got {loss.min_snr_gamma}")
    if loss.timestep_min < 0 or (loss.timestep_max is not None and loss.timestep_max <= loss.timestep_min):
        problems.add(f"train.loss.timestep_min / timestep_max: need 0 <= timestep_min < timestep_max, "
                     f"got {loss.timestep_min} and {loss.timestep_max}")
    ema = None
    if model_spec.ema is not None:
        ema = collect(read_fields, model_spec.ema, "model.ema", EmaSpec)
        if ema is not None and not 0.0 <= ema.decay <= 1.0:
            problems.add(f"model.ema.decay: must be in [0, 1] (0.999 is usual), got {ema.decay}")
    preview = None
    if cfg.get("previewer") is not None:
        preview = collect(read_fields, cfg.get("previewer"), "previewer", PreviewSpec)
        if preview is not None and (preview.step < 1 or not preview.prompts):
            problems.add("previewer: needs step >= 1 and at least one prompt in previewer.prompts")
    log_with = list(train_spec.log_with or [])
    for name in log_with:
        if name not in TRACKERS:
            problems.add(f"train.log_with: unknown tracker {name!r}; use {' or '.join(TRACKERS)}")
    if "wandb" in log_with and importlib.util.find_spec("wandb") is None:
        problems.add("train.log_with: 'wandb' needs the wandb package, which is not installed; "
                     "run `pip install wandb` (and `wandb login`) or remove it")
    compile_spec = collect(read_compile_spec, train_spec.compile)
    problems.raise_any()
    return ExtraSpecs(loss=loss, ema=ema, preview=preview, log_with=log_with, compile=compile_spec)


def preview_pipeline(parts: Any, components: dict[str, Any], objective: Any) -> Any:
    """The family's diffusers pipeline over the trainer's own (unwrapped) modules, adapters active, with the model's
    sampler: the same pipeline the visualizer builds, so previews and renders cannot drift apart."""
    from hcpdiff.infer.pipeline import inference_scheduler, zero_snr_sampler

    scheduler = inference_scheduler(parts)
    # a DDPM objective may train another prediction type than the model shipped with (train.loss.prediction_type)
    prediction_type = getattr(objective, "prediction_type", None)
    if prediction_type is not None and scheduler.config.get("prediction_type") != prediction_type:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    if getattr(objective, "zero_terminal_snr", False) and not scheduler.config.get("rescale_betas_zero_snr", False):
        scheduler = zero_snr_sampler(scheduler, "train.loss.zero_terminal_snr")
    pipe = parts.family.build_pipeline(components, scheduler)
    parts.family.configure_pipeline(pipe, parts.pipeline_settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_wandb(exp_dir: Any, config: dict) -> Any:
    """accelerate's Weights & Biases tracker for this run (project `hcpdiff`, run named after the folder)."""
    from accelerate.tracking import WandBTracker

    tracker = WandBTracker("hcpdiff", name=str(getattr(exp_dir, "name", exp_dir)))  # run_name is the project
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker
