"""The training run: setup() builds everything from the config, train() runs the step loop."""
from __future__ import annotations

import functools
import gc
import json
import logging
import os
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hcpdiff.config import check_targets, instantiate, read_fields
from hcpdiff.data import build_dataset
from hcpdiff.data.builders import BuiltDataset, check_dataset_fields
from hcpdiff.data.latent_cache import CachedLatentDataset, LatentEncoder, vae_identity
from hcpdiff.data.tensor_store import TensorStore
from hcpdiff.errors import ConfigError, ConfigProblems
from hcpdiff.families import TRAINABLE_PARTS, Family
from hcpdiff.infer.condition_images import path_list
from hcpdiff.lora import LoraGroupSpec, attach_lora, load_checkpoint, load_lora_into, lora_state_dict, save_lora
from hcpdiff.lora.spec import AttachedGroup
from hcpdiff.lora.state_io import lora_metadata
from hcpdiff.models import cast_floats, checkpoint_blocks, enable_gradient_checkpointing, load_model_parts
from hcpdiff.models.controlnet import (checkpoint_metadata, controlnet_base, needs_init_folder,
                                       new_or_loaded_controlnet, write_init_folder)
from hcpdiff.models.loading import peek_expert, peek_model
from hcpdiff.models.parts import render_components
from hcpdiff.models.quantize import check_quantize_parts, check_quantize_values, is_quantized, quantize_parts
from hcpdiff.objectives.ddpm import sample_noise
from hcpdiff.objectives.flow_matching import restricted_to_sigmas
from hcpdiff.train.class_images import generate_class_images
from hcpdiff.train.exp_dir import (LOCK_NAME, claim_exp_dir, lock_exp_dir, remove_if_no_outputs,
                                   remove_stale_temp_files, unlock_exp_dir)
from hcpdiff.train.compile import batch_shapes, compile_denoiser, compile_refusal, eager
from hcpdiff.train.finetune import (FinetuneGroup, FinetuneGroupSpec, enable_finetuning, finetuned_state,
                                    load_finetuned, select_finetune_groups)
from hcpdiff.train.logs import setup_run_logging
from hcpdiff.train.extras import preview_pipeline, read_extra_specs, start_wandb
from hcpdiff.train.ema import EmaWeights
from hcpdiff.train.embeddings import (attach_embeddings, load_embedding_checkpoints, read_embeddings_spec,
                                      save_embedding_checkpoints, wants_embeddings)
from hcpdiff.train.memory import (activations_offloaded, lowering_options, memory_table, on_device, out_of_memory,
                                  peak_rss_mib, setup_block_swap)
from hcpdiff.train.metrics import SmoothedValue, peak_memory_mib
from hcpdiff.train.preview import preview_prompt_args, render_previews, save_previews
from hcpdiff.train.optim import build_lr_scheduler, build_optimizer, param_groups
from hcpdiff.train.specs import RUN_SCALARS, ModelSpec, RunSpec, SchedulerSpec, TrainSpec, checkpointed_block_count
from hcpdiff.train.state import (ResumePoint, find_resume_state, folder_steps, load_checked_state, prune_checkpoints,
                                 resume_dir_of, rng_state, save_state, set_rng_state, step_files)
from hcpdiff.train.sharding import (
    align_deepspeed_config, check_fsdp_taken, check_sharded_run, gathered_for_saving, gathered_state,
    load_whole_optimizer_state, local_numel, param_count, whole_optimizer_state, whole_weights_loading, zero_stage,
)
from hcpdiff.train.signals import StopSignals, TrainingInterrupted
from hcpdiff.train.starting_points import fuse_preset_loras, load_initial_loras
from hcpdiff.train.streams import DataStream, ResumableBatchSampler, collate_batch
from hcpdiff.train.transfer import batch_on_device, floats_on_device
from hcpdiff.train.text_cache import TEXT_CACHE_FOLDER, CachedConditioner, can_cache_text, text_identity

logger = logging.getLogger("hcpdiff.train")


@dataclass
class TrainedPart:
    """One model part this run trains: LoRA groups (`lora_<part>`) and / or fully trained groups (`<part>:`)."""

    name: str  # the part's diffusers folder name: unet, transformer, text_encoder, ...
    module: torch.nn.Module  # the plain model, adapters attached
    lora_specs: list[LoraGroupSpec]
    lora_groups: list[AttachedGroup] = field(default_factory=list)
    finetune_groups: list[FinetuneGroup] = field(default_factory=list)
    forward: torch.nn.Module | None = None  # the accelerate-prepared (e.g. DDP-wrapped) module that runs the step


def cache_accelerate_probes() -> None:
    """accelerate's optimizer wrapper asks `is_lomo_available()` twice a step, and each ask searches the installed
    packages' metadata anew (~0.2 ms; 1% of a host-bound step): answer it once per process."""
    import accelerate.optimizer

    probe = accelerate.optimizer.is_lomo_available
    if not hasattr(probe, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(probe)


class Trainer:
    """A LoRA (and optionally full fine-tuning) run of a text-to-image diffusion model, driven by one resolved config."""

    def __init__(self, cfg: DictConfig, *, single_process: bool = False):
        self.cfg = cfg
        self.single_process = single_process
        self.global_step = 0
        self.training_started = False
        self.fsdp = False  # accelerate set up an FSDP2 run (known once the accelerator is)

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the config, then build accelerator, experiment folder, models, LoRA, data and optimizer."""
        self._read_specs()
        self._setup_accelerator()
        self._setup_exp_dir()
        self._setup_models()
        self._setup_lora()
        # prior preservation: class folders filled by the base model (adapters bypassed) before the data scans them
        generate_class_images(self.cfg.data, self.parts, self.accelerator, self.model_spec.clip_skip,
                              cannot_render="an FSDP run does not do (its model is placed shard by shard)"
                              if self.fsdp else None)
        self._setup_data()
        if self.resume_state is not None:  # into the plain models, before accelerate wraps (FSDP: shards) them
            self._restore_weights(int(self.resume_state["step"]))
        self._setup_optimization()
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self._setup_extras()
        self._log_start()

    def _read_specs(self) -> None:
        cfg = self.cfg
        problems = ConfigProblems()
        collect = problems.collect
        collect(check_targets, cfg)
        run = {key: cfg.get(key) for key in RUN_SCALARS if key in cfg}
        if run.get("mixed_precision") is False:  # YAML reads accelerate's `no` as false
            run["mixed_precision"] = "no"
        collect(read_fields, run, "", RunSpec)
        self.train_spec = collect(read_fields, cfg.get("train", {}), "train", TrainSpec)
        self.model_spec = collect(read_fields, cfg.get("model", {}), "model", ModelSpec)
        self.checkpointed_blocks = collect(checkpointed_block_count, self.model_spec) if self.model_spec else None
        self.scheduler_spec = None
        if self.train_spec is not None:
            self.scheduler_spec = collect(read_fields, self.train_spec.scheduler or {}, "train.scheduler", SchedulerSpec)
            if self.model_spec is not None:
                self.extras = collect(read_extra_specs, cfg, self.train_spec, self.model_spec)
        # Every part some family trains is read now, so typos are found before a model loads; whether this model
        # has the part is checked once it is loaded.
        self.lora_specs: dict[str, list[LoraGroupSpec]] = {}
        for part in TRAINABLE_PARTS:
            key = f"lora_{part}"
            self.lora_specs[part] = [
                spec for i, node in enumerate(cfg.get(key) or [])
                if (spec := collect(read_fields, node, f"{key}[{i}]", LoraGroupSpec)) is not None
            ]
        self.finetune_specs: dict[str, list[FinetuneGroupSpec]] = {}
        for part in TRAINABLE_PARTS:
            self.finetune_specs[part] = [
                spec for i, node in enumerate(cfg.get(part) or [])
                if (spec := collect(read_fields, node, f"{part}[{i}]", FinetuneGroupSpec)) is not None
            ]
        self.embeddings_spec = collect(read_embeddings_spec, cfg)  # (key, section, entries) or None
        if self.train_spec is not None:
            steps, epochs = self.train_spec.train_steps, self.train_spec.train_epochs
            if steps is None and epochs is None:
                problems.add("train: set train.train_steps or train.train_epochs (both are null)")
            if self.train_spec.optimizer is None:
                problems.add("train.optimizer: missing; give a `_target_` optimizer with `_partial_: true`")
        if self.model_spec is not None and not self.model_spec.pretrained_model_name_or_path:
            problems.add("model.pretrained_model_name_or_path: missing; give a diffusers folder or a hub id")
        if self.model_spec is not None:
            for message in check_quantize_values(self.model_spec.quantize):
                problems.add(message)
        # groups that exist but failed to read have their own message; "none configured" would be false beside it
        any_group = any(cfg.get(f"lora_{part}") or cfg.get(part) for part in TRAINABLE_PARTS)
        if not any_group and not wants_embeddings(cfg):
            problems.add(f"{' / '.join('lora_' + part for part in TRAINABLE_PARTS)}: no LoRA group is configured "
                         f"(nor a {' / '.join(TRAINABLE_PARTS)} fine-tuning group, nor embeddings.train), "
                         "so nothing would train")
        if not cfg.get("data"):
            problems.add("data: no dataset is configured")
        elif isinstance(cfg.get("data"), DictConfig):
            for name, node in cfg.data.items():
                check_dataset_fields(node, f"data.{name}", problems)
        problems.raise_any()
        # A local model's family is known from its configs: check the run against it before any weights load.
        spec = self.model_spec
        peeked = peek_model(spec.pretrained_model_name_or_path, single_file_config=spec.single_file_config,
                            drop_t5=spec.drop_t5)
        self.checked_family = None
        if peeked is not None:
            family, noise_scheduler = peeked
            self._check_for_family(family, noise_scheduler, family.dropped_parts(spec.drop_t5, "model.drop_t5"))
            peek_expert(spec.pretrained_model_name_or_path, family, spec.expert, "model.expert")
            self.checked_family = family

    def _setup_accelerator(self) -> None:
        mixed_precision = self.cfg.get("mixed_precision") or "no"
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            logger.warning("mixed_precision 'fp16' needs a GPU; training in fp32 on the CPU")
            mixed_precision = "no"
        # accelerate treats torchrun's processes as one distributed (gloo) run on a CPU only when told cpu=True,
        # which also turns DeepSpeed off; a DeepSpeed launch without a GPU instead names gloo, so DeepSpeed's CPU
        # accelerator runs and accelerate counts the processes (a CPU check of the DeepSpeed path, as in the tests).
        no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        handlers = []
        if no_gpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            no_gpu = False
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cache_accelerate_probes()
        self.accelerator = Accelerator(
            cpu=no_gpu,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=self.train_spec.gradient_accumulation_steps,
            kwargs_handlers=handlers,
        )
        if not self.accelerator.is_main_process:  # one copy of each info line, from the main process
            logging.getLogger("hcpdiff").setLevel(logging.WARNING)
        if self.single_process and self.accelerator.num_processes > 1:
            from hcpdiff.train.run import SEVERAL_PROCESSES

            raise ConfigError(SEVERAL_PROCESSES)
        self.deepspeed_config = None
        distributed_type = self.accelerator.distributed_type
        if distributed_type == DistributedType.DEEPSPEED:
            self.deepspeed_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        check_fsdp_taken(distributed_type)
        self.fsdp = distributed_type == DistributedType.FSDP
        fsdp_plugin = self.accelerator.state.fsdp_plugin if self.fsdp else None
        embeddings_key = self.embeddings_spec[0] if self.embeddings_spec else "embeddings"
        check_sharded_run(distributed_type, self.deepspeed_config,
                          [p for p in TRAINABLE_PARTS if self.lora_specs[p] or self.finetune_specs[p]],
                          self.train_spec.resume,
                          ema=bool((self.cfg.get("model") or {}).get("ema")), preview=bool(self.cfg.get("previewer")),
                          fsdp_version=getattr(fsdp_plugin, "fsdp_version", None),
                          unsupported_under_fsdp={
                              "model.blocks_to_swap": bool(self.model_spec.blocks_to_swap),
                              "model.quantize": bool(self.model_spec.quantize),
                              "train.compile": self.extras.compile is not None,
                              embeddings_key: bool(self.embeddings_spec),
                          })
        if self.extras.compile is not None:
            refusal = compile_refusal(zero_stage=zero_stage(self.deepspeed_config),
                                      blocks_to_swap=self.model_spec.blocks_to_swap,
                                      gradient_checkpointing=self.model_spec.gradient_checkpointing)
            if refusal:
                raise ConfigError(refusal)
        # DeepSpeed's sharded optimizer state lives in every process, and one process's copy cannot resume a run;
        # FSDP2's is gathered whole into the state file.
        self.writes_resume_state = distributed_type != DistributedType.DEEPSPEED
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = bool(self.cfg.get("allow_tf32", True))
        self.seed = int(self.cfg.get("seed", 0))
        set_seed(self.seed)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)

    def _setup_exp_dir(self) -> None:
        # Only the main process creates (or, resuming, locks) the folder; the others learn its name from it.
        # A resumed run goes on in the folder it resumes.
        self.resume_state = None
        self.exp_lock: Path | None = None
        self.created_exp_dir = False
        claimed: list = [None, None, None]  # folder, resumed step, the error that stopped the main process
        refused = None
        if self.accelerator.is_main_process:
            try:
                claimed[:2] = self._claim_exp_dir()
            except ConfigError as err:  # told to the other processes too, so none waits for a folder name forever
                refused, claimed[2] = err, str(err)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(claimed)
        if claimed[2] is not None:
            raise refused or ConfigError(claimed[2])
        self.exp_dir = Path(claimed[0])
        if self.resume_state is None and claimed[1] is not None:  # the state the main process chose, checked again
            self.resume_state = load_checked_state(self.exp_dir, int(claimed[1]))
        self.ckpt_dir = self.exp_dir / "ckpts"
        self.tracker = None
        if self.accelerator.is_main_process:
            self.ckpt_dir.mkdir(exist_ok=True)
            snapshot = OmegaConf.to_container(self.cfg, resolve=True)
            snapshot["exp_dir"] = str(self.exp_dir)
            cfg_name = f"cfg-resume-{self.resume_state['step']}.yaml" if self.resume_state else "cfg.yaml"
            (self.exp_dir / cfg_name).write_text(OmegaConf.to_yaml(OmegaConf.create(snapshot)))
            self.log_handler = setup_run_logging(self.exp_dir / "train.log")
            tracker = TensorBoardTracker("tblog", logging_dir=self.exp_dir)
            tracker.start()
            self.tracker = tracker  # only once started: cleanup finishes what exists (a SIGTERM may land in between)

    def _claim_exp_dir(self) -> tuple[str, int | None]:
        """Main process: lock the folder to resume (and choose its state), or create and lock a new one."""
        if self.train_spec.resume:
            exp_dir = resume_dir_of(self.train_spec.resume)
            self.exp_lock = exp_dir / LOCK_NAME  # named first: a signal right after the lock is made still frees it
            lock_exp_dir(exp_dir)  # before reading: a live run may be writing its states
            remove_stale_temp_files(exp_dir)
            point = find_resume_state(self.train_spec.resume)
            self._check_resume_point(point)
            self.resume_state = point.state
            return str(exp_dir), point.step
        exp_dir = claim_exp_dir(self.cfg.get("exp_dir") or "exps/run")
        self.created_exp_dir = True
        self.exp_lock = exp_dir / LOCK_NAME  # cleanup removes it only if this process wrote it
        lock_exp_dir(exp_dir)
        return str(exp_dir), None

    def _check_resume_point(self, point: ResumePoint) -> None:
        """Refuse a resume that would do nothing or overwrite another run's later steps (main process)."""
        spec = self.train_spec
        if spec.train_epochs is None and spec.train_steps is not None and spec.train_steps <= point.step:
            raise ConfigError(f"train.resume: the state is at step {point.step} and train.train_steps is "
                              f"{spec.train_steps}, so there is nothing to train; "
                              f"set train.train_steps above {point.step}")
        later = [step for step in folder_steps(point.exp_dir) if step > point.step and step not in point.skipped]
        if not later:
            return
        shown = ", ".join(map(str, later[:6])) + (", ..." if len(later) > 6 else "")
        if not point.named_file:
            # Resuming the folder continues its newest intact state; later files are a killed run's partial writes
            # (a checkpoint without its state), which this run writes again.
            logger.warning("%s: step(s) %s have no intact state and will be written again", point.exp_dir, shown)
            return
        if not spec.resume_overwrite:
            raise ConfigError(
                f"train.resume: '{point.exp_dir}' already holds step(s) {shown} after step {point.step}; resuming here "
                f"would overwrite them and mix two runs in one folder. Copy the folder and resume the copy, or set "
                f"train.resume_overwrite=true to delete steps after {point.step} and continue in this folder")
        removed = [path for step in later for path in step_files(point.exp_dir, step)]
        for path in removed:
            path.unlink(missing_ok=True)
        logger.warning("train.resume_overwrite: deleted step(s) %s of %s (%d files)",
                       shown, point.exp_dir, len(removed))

    def _setup_models(self) -> None:
        spec = self.model_spec
        # Under ZeRO-3, transformers would partition the frozen text encoders as they load (zero.Init), and they
        # run outside DeepSpeed's engine; load every part whole and let the engine shard what it trains.
        with whole_weights_loading(self.accelerator):
            self.parts = load_model_parts(spec.pretrained_model_name_or_path, revision=spec.revision,
                                          single_file_config=spec.single_file_config, drop_t5=spec.drop_t5,
                                          expert=spec.expert, expert_key="model.expert")
        self.family = self.parts.family
        for module in self.parts.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        if self.family is self.checked_family:  # checked before loading: the objective, now with the loaded scheduler
            self.objective = self.family.build_objective(self.parts.noise_scheduler, self.extras.loss)
        else:  # a hub model or a single file without a local config folder could not be checked before
            absent = tuple(part for part in self.family.trainable_parts if self.parts.components.get(part) is None)
            self.objective = self._check_for_family(self.family, self.parts.noise_scheduler, absent)
        if self.parts.expert is not None:  # one of the model's denoising experts: it trains on its own sigmas
            expert = self.parts.expert
            self.objective = restricted_to_sigmas(self.objective, expert.sigma_min, expert.sigma_max, "model.expert")
        fuse_preset_loras(self.parts, spec.preset_lora)
        if spec.controlnet:
            self._setup_controlnet(spec.controlnet)
        if spec.quantize:  # after preset LoRAs are fused into the base, before LoRA attaches
            for part, (done, total) in quantize_parts(self.parts.components, spec.quantize, self.weight_dtype,
                                                          self.accelerator.device).items():
                kept = str(self.weight_dtype).removeprefix("torch.")
                rest = f"; the other {total - done} keep {kept}" * (done < total)
                logger.info(f"model.quantize: {done} of the {part}'s {total} Linear layers store {spec.quantize[part]} "
                            f"weights{rest}")
        # an editing family's conditioner also encodes the input images, at this area
        condition = {"condition_area": spec.condition_area} if self.family.condition_images else {}
        self.conditioner = self.family.build_conditioner(self.parts.components, spec.tokenizer_repeats, spec.clip_skip,
                                                         max_sequence_length=spec.max_sequence_length,
                                                         guidance=self.train_spec.guidance, **condition)

    def _setup_controlnet(self, value: str) -> None:
        """`model.controlnet`: load it (or make it from the U-Net) as the part `controlnet`; a new one, or one read
        from a file, has its starting weights written to the experiment folder (its checkpoints' base), and a resumed
        run starts from those."""
        base = controlnet_base(value, self.exp_dir)
        if needs_init_folder(value) and Path(base).is_dir():  # resumed: the same starting weights
            value = base
        controlnet = new_or_loaded_controlnet(value, self.family, self.parts.components, "model.controlnet")
        controlnet.requires_grad_(False)
        if needs_init_folder(value) and self.accelerator.is_main_process:
            write_init_folder(controlnet, self.exp_dir)
        self.parts.components["controlnet"] = controlnet
        self.controlnet_base = base

    def _check_for_family(self, family: Family, noise_scheduler: Any, absent: tuple[str, ...]) -> Any:
        """The family's checks of this run: groups only for parts it has (and loads), its own run settings
        (FLUX refuses fp16), train.loss read by its objective. Returns the objective."""
        problems = ConfigProblems()
        # the ControlNet is loaded after the model, when model.controlnet names one: nothing to train or quantize else
        absent = (*(part for part in absent if part != "controlnet"),
                  *(() if self.model_spec.controlnet else ("controlnet",)))
        for part in TRAINABLE_PARTS:
            keys = [f"lora_{part}"] * bool(self.lora_specs[part]) + [part] * bool(self.finetune_specs[part])
            if part not in family.trainable_parts:
                for key in keys:
                    problems.add(f"{key}: a {family.description} model has no {part}; its trainable parts are "
                                 f"{', '.join(family.trainable_parts)}")
            elif part == "controlnet" and not self.model_spec.controlnet:
                for key in keys:
                    problems.add(f"{key}: no ControlNet to train; set model.controlnet (unet: a new one from the "
                                 "U-Net's weights, or a ControlNet folder / file to continue)")
            elif part in absent:
                for key in keys:
                    problems.add(f"{key}: model.drop_t5 is true, so the {part} is not loaded; set model.drop_t5 "
                                 "to false to train it")
        if self.model_spec.controlnet and not family.takes_controlnet:
            problems.add(f"model.controlnet: a {family.description} model takes no ControlNet here (SD and SDXL do); "
                         "remove it")
        self._check_condition_images(family, problems)
        if self.checkpointed_blocks and not family.block_lists:
            problems.add(f"model.gradient_checkpointing.blocks: a {family.description} model has no transformer "
                         "blocks to choose from; use gradient_checkpointing: true")
        if self.model_spec.blocks_to_swap and not family.block_lists:
            problems.add(f"model.blocks_to_swap: a {family.description} model has no transformer blocks to swap; "
                         "remove it (gradient_checkpointing lowers a U-Net's memory)")
        quantize = self.model_spec.quantize or {}
        for message in check_quantize_parts(quantize, [p for p in family.trainable_parts if p not in absent],
                                            family.description):
            problems.add(message)
        for part in quantize:
            if self.finetune_specs.get(part):
                problems.add(f"model.quantize.{part}: the {part} is fully fine-tuned ({part}: groups), and only frozen "
                             "weights can be quantized; remove one of the two")
        problems.raise_any()
        family.check_run(self.cfg.get("mixed_precision"))
        return family.build_objective(noise_scheduler, self.extras.loss)

    def _check_condition_images(self, family: Family, problems: ConfigProblems) -> None:
        """An editing family trains every source with its input images and previews with them; another family takes
        none (each key at fault named)."""
        preview = self.extras.preview
        sources = [(f"data.{name}.source.{source_name}", source) for name, node in (self.cfg.get("data") or {}).items()
                   if isinstance(node, Mapping) and isinstance(node.get("source"), Mapping)
                   for source_name, source in node["source"].items() if isinstance(source, Mapping)]
        if self.model_spec.controlnet and family.takes_controlnet:  # the control images take the input images' way
            for where, source in sources:
                if source.get("condition_column") is None:
                    problems.add(f"{where}.condition_column: a ControlNet trains on (control image, prompt, image); "
                                 "name the metadata column holding each row's control image")
            if preview is not None and not preview.condition_images:
                problems.add("previewer.condition_images: previews with a ControlNet need its control image; give "
                             "one image path per preview prompt (or one for all)")
            for entry in path_list(preview.condition_images) if preview is not None else []:
                if not isinstance(entry, str):
                    problems.add("previewer.condition_images: a ControlNet takes one control image per prompt, "
                                 f"not a list ({entry})")
                elif not Path(entry).is_file():
                    problems.add(f"previewer.condition_images: image file '{entry}' does not exist")
            return
        if family.condition_images:
            for where, source in sources:
                if source.get("condition_column") is None:
                    problems.add(f"{where}.condition_column: a {family.description} model trains on (input image, "
                                 "prompt, edited image); name the metadata column holding each row's input image "
                                 "(e.g. edit_image)")
            if preview is not None and not preview.condition_images:
                problems.add(f"previewer.condition_images: a {family.description} model edits an input image; give "
                             "one image path per preview prompt (or one for all)")
            entries = path_list(preview.condition_images) if preview is not None else []
            for path in (path for entry in entries for path in ([entry] if isinstance(entry, str) else entry)):
                if not Path(path).is_file():
                    problems.add(f"previewer.condition_images: image file '{path}' does not exist")
            return
        for where, source in sources:
            if source.get("condition_column") is not None:
                problems.add(f"{where}.condition_column: a {family.description} model takes no input image; remove it")
        if preview is not None and preview.condition_images:
            problems.add(f"previewer.condition_images: a {family.description} model takes no input image; remove it")
        if self.cfg.get("model", {}).get("condition_area") is not None:
            problems.add(f"model.condition_area: a {family.description} model takes no input image; remove it")

    def _setup_lora(self) -> None:
        self.trained: dict[str, TrainedPart] = {}
        layer_lists = {}
        for part in self.family.trainable_parts:
            key, lora_specs, finetune_specs = f"lora_{part}", self.lora_specs[part], self.finetune_specs[part]
            if not lora_specs and not finetune_specs:
                continue
            model = self.parts.components[part]
            # Fine-tuned parameters are picked by their plain names, before adapters wrap the layers holding them.
            finetune = select_finetune_groups(model, finetune_specs, part)
            with warnings.catch_warnings():
                # peft warns that an adapter on a torchao layer cannot merge into it; training never merges, and the
                # visualizer merges into an unquantized base
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
                attached = (attach_lora(model, lora_specs, part, key, self.family.unused_layers(part, model))
                            if lora_specs else [])
            enable_finetuning(finetune)  # after attach_lora froze everything but the adapters
            self.trained[part] = TrainedPart(part, model, lora_specs, attached, finetune)
            if attached:
                layer_lists[key] = [{"group": f"{key}[{i}]", "lr": g.lr, "layers": list(g.layers)}
                                    for i, g in enumerate(attached)]
            if finetune:
                layer_lists[part] = [{"group": g.name, "lr": g.lr, "modules": g.layers, "params": list(g.named_params)}
                                     for g in finetune]
        # One optimizer param group per trained group, part by part (LoRA groups, then fully trained ones), named
        # as the config writes them.
        self.groups = [group for trained in self.trained.values()
                       for group in (*trained.lora_groups, *trained.finetune_groups)]
        self.group_labels = [label for part, trained in self.trained.items()
                             for label in (*(f"lora_{part}[{i}]" for i in range(len(trained.lora_groups))),
                                           *(group.name for group in trained.finetune_groups))]
        self.embedding_groups = []
        if self.embeddings_spec is not None:  # their text encoders train (and are prepared) for their vectors
            _, section, entries = self.embeddings_spec
            components = self.parts.components
            self.embedding_groups = attach_embeddings(entries, section.emb_dir, components, self.family.tokenizers,
                                                      self.family.text_encoders)
            for part in self.family.text_encoders:
                self.trained.setdefault(part, TrainedPart(part, components[part], []))
            self.groups += self.embedding_groups
            self.group_labels += [group.name for group in self.embedding_groups]
        lora_parts = [part for part, trained in self.trained.items() if trained.lora_specs]
        load_initial_loras({part: self.trained[part].module for part in lora_parts}, self.model_spec.init_lora,
                           lora_parts, denoiser=self.family.denoiser,
                           expert=self.parts.expert.name if self.parts.expert else None)
        if self.accelerator.is_main_process:
            (self.exp_dir / "lora_layers.json").write_text(json.dumps(layer_lists, indent=1))
        if self.checkpointed_blocks:  # {blocks: N}: the first N blocks in the order they run
            blocks = self.family.swappable_blocks(self.parts.denoiser)
            if self.checkpointed_blocks > len(blocks):
                raise ConfigError(f"model.gradient_checkpointing.blocks: {self.checkpointed_blocks}, but this "
                                  f"{self.family.description} transformer has {len(blocks)} blocks; give at most "
                                  f"{len(blocks)} (or true for all)")
            checkpoint_blocks(blocks[:self.checkpointed_blocks])
        elif self.model_spec.gradient_checkpointing:
            enable_gradient_checkpointing(self.parts.denoiser)
        if self.model_spec.gradient_checkpointing:
            for part in (*self.family.text_encoders, "controlnet"):  # the other parts that train
                if part in self.trained:
                    enable_gradient_checkpointing(self.trained[part].module)
        # Frozen weights run in the mixed-precision dtype; trained adapters and fine-tuned weights stay fp32.
        device = self.accelerator.device
        self.block_swapper = None
        for part, module in self.parts.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            dtype = self.weight_dtype if part != "vae" or self.weight_dtype == torch.bfloat16 else torch.float32
            for param in module.parameters():
                if not param.requires_grad and not is_quantized(param):  # quantized storage keeps its own dtype
                    param.data = param.data.to(dtype)
            if part == self.family.denoiser and self.model_spec.blocks_to_swap:
                self.block_swapper = self._swap_blocks(module)  # the swapped blocks never reach the device whole
            elif self.fsdp and part in self.trained:
                pass  # fully_shard moves it to the device block by block, keeping each process's shard only
            else:
                module.to(device)

    def _swap_blocks(self, denoiser: torch.nn.Module):
        """`model.blocks_to_swap`: keep that many of the denoiser's blocks in CPU memory; place the rest."""
        if self.accelerator.num_processes > 1 or self.deepspeed_config is not None:
            raise ConfigError("model.blocks_to_swap: block swap runs in one process without DeepSpeed; remove it or "
                              "train with one plain process")
        swapper = setup_block_swap(denoiser, self.family.swappable_blocks(denoiser), self.model_spec.blocks_to_swap,
                                   self.accelerator.device, self.family.description)
        swapper.place(denoiser)
        return swapper

    def _setup_data(self) -> None:
        self.streams: list[DataStream] = []
        workers = self.train_spec.workers
        latent_encoder = LatentEncoder(self.encode_latent_dist, vae_identity(self.parts.vae, str(self.parts.name_or_path)))
        built_datasets: dict[str, BuiltDataset] = {}
        for name, node in self.cfg.data.items():
            built = build_dataset(
                node, f"data.{name}", pixel_step=self.parts.pixel_step, seed=self.seed,
                instantiate=instantiate,
                num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
                latent_encoder=latent_encoder, barrier=self.accelerator.wait_for_everyone,
                show_progress=self.accelerator.is_main_process,
                text_encoder_trained=any(part in self.trained for part in self.family.text_encoders),
                max_conditions=self.family.condition_images or int(bool(self.model_spec.controlnet)),
                frame_step=self.family.frame_step,
                uint8_pixels=True,  # converted on the device (compute_loss)
            )
            built_datasets[name] = built
            # The loader's own generator keeps worker seeding off the global RNG, so resuming replays it exactly.
            loader = DataLoader(
                built.dataset, batch_sampler=ResumableBatchSampler(built.batch_sampler), num_workers=workers,
                collate_fn=collate_batch, pin_memory=torch.cuda.is_available(),
                persistent_workers=workers > 0, generator=torch.Generator().manual_seed(self.seed),
            )
            self.streams.append(DataStream(name, loader, built.loss_weight))
        # what train.compile makes room for: every dataset's batch shapes (each is its own graph with dynamic=False)
        self.batch_shapes = sum(batch_shapes(built.bucket.sizes, built.batch_size) for built in built_datasets.values())
        self.batch_size = self.streams[0].loader.batch_sampler.batch_size
        self.preview_prompt_args = None  # the previews' encoded prompts, when the text encoders are released
        self._setup_text_cache(built_datasets)
        self._park_vae()

    def _park_vae(self) -> None:
        """Every dataset trains on cached latents (and no input image is encoded per step): the VAE waits in CPU
        memory for the training loop; previews bring it back while they render."""
        self.vae_parked = (self.family.condition_images == 0
                           and all(isinstance(stream.loader.dataset, CachedLatentDataset) for stream in self.streams))
        if self.vae_parked:
            self.parts.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.info("vae in CPU memory for the training loop: every latent is cached (previews bring it back)")

    def _setup_text_cache(self, built_datasets: dict[str, BuiltDataset]) -> None:
        """Encode every prompt the datasets can give once (in memory, or under each dataset's cache_dir, reused by
        later runs); when every dataset's prompts are cached, release the text encoders for the rest of the run."""
        cached = {name: built for name, built in built_datasets.items() if built.text_cache_prompts}
        if not cached or not can_cache_text(self.conditioner):
            return
        identity = text_identity(self.family, self.conditioner, self.parts.components, str(self.parts.name_or_path))
        conditioner = CachedConditioner(self.conditioner, identity)
        memory, places = TensorStore(what="text cache"), []
        for name, built in cached.items():
            store = memory
            if built.cache_dir is not None:
                store = TensorStore(Path(built.cache_dir) / TEXT_CACHE_FOLDER, what="text cache",
                                    where=f"data.{name}.cache_dir")
            conditioner.add(built.text_cache_prompts, store)
            places.append("in memory" if store is memory else f"in {store.cache_dir}")
        accelerator = self.accelerator
        report = conditioner.fill(accelerator.device, accelerator.autocast, num_replicas=accelerator.num_processes,
                                  rank=accelerator.process_index, barrier=accelerator.wait_for_everyone)
        logger.info("text embeddings cached %s for %d prompts: %d encoded, %d reused",
                    " and ".join(dict.fromkeys(places)), len(conditioner.prompts), report.encoded, report.reused)
        self.conditioner = conditioner
        if len(cached) < len(built_datasets):
            return
        if self.family.renders_from_text and self.extras.preview is not None:
            logger.info("text encoders kept for the previews: the %s pipeline encodes prompt text itself",
                        self.family.description)
            return
        self._release_text_encoders()

    def _release_text_encoders(self) -> None:
        """Every prompt the data gives is cached and no text encoder trains: drop the encoders (after encoding the
        previews' prompts, which never change either), so their memory is free for the rest of the run."""
        if self.extras.preview is not None and self.accelerator.is_main_process:
            pipe = preview_pipeline(self.parts, self.parts.components, self.objective)
            with torch.no_grad(), self.accelerator.autocast():
                self.preview_prompt_args = preview_prompt_args(pipe, self.family, self.extras.preview,
                                                               self.model_spec.clip_skip)
        self.conditioner.release_encoders()
        for part in self.family.text_encoders:
            self.parts.components[part] = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("text encoders released (%s): every prompt is cached", ", ".join(self.family.text_encoders))

    def _setup_optimization(self) -> None:
        spec, accelerator = self.train_spec, self.accelerator
        steps_per_epoch = max(1, len(self.streams[0].loader) // spec.gradient_accumulation_steps)
        # As in the reference guide, a config that sets train_epochs trains by epochs whatever train_steps says.
        if spec.train_epochs is not None:
            self.train_steps = spec.train_epochs * steps_per_epoch
        else:
            self.train_steps = spec.train_steps
        self.total_batch_size = self.batch_size * spec.gradient_accumulation_steps * accelerator.num_processes
        lr_scale = self.total_batch_size if spec.scale_lr else 1.0
        if self.deepspeed_config is not None:
            replaced = align_deepspeed_config(self.deepspeed_config, self.batch_size, spec.gradient_accumulation_steps,
                                              spec.max_grad_norm, accelerator.num_processes)
            if replaced and accelerator.is_main_process:
                logger.warning("DeepSpeed config follows the hcpdiff config (data batch_size, "
                               "train.gradient_accumulation_steps, train.max_grad_norm): %s", ", ".join(replaced))
        # plain lists and dicts for its arguments: an optimizer keeps them (betas) in the state that resume reads back
        # with weights_only, which refuses OmegaConf containers
        make_optimizer = instantiate(spec.optimizer, "train.optimizer", _convert_="all")
        optimizer = build_optimizer(make_optimizer, param_groups(self.groups, lr_scale))
        # The lr schedule is stepped by hand once per optimizer step, so it counts what the config says.
        self.lr_scheduler = build_lr_scheduler(
            self.scheduler_spec.name, optimizer, self.scheduler_spec.num_warmup_steps,
            self.train_steps, self.scheduler_spec.scheduler_kwargs,
        )
        for trained in self.trained.values():
            # DDP broadcasts every parameter when it wraps a module, which torchao's quantized tensors do not support;
            # they are frozen and the same in every process (same file, same deterministic quantization)
            quantized = [name for name, param in trained.module.named_parameters() if is_quantized(param)]
            if quantized:
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    trained.module, quantized)
        # accelerate would move a block-swapping denoiser to the device whole (block swap runs without DeepSpeed,
        # which refuses any placement argument)
        placement = ({"device_placement": [part != self.family.denoiser for part in self.trained] + [True]}
                     if self.block_swapper else {})
        if self.fsdp:
            self._drop_group_params()
        prepared = accelerator.prepare(*(trained.module for trained in self.trained.values()), optimizer, **placement)
        for trained, module in zip(self.trained.values(), prepared[:-1]):
            trained.forward = module
        self.optimizer = prepared[-1]
        if self.fsdp:
            self._follow_sharded_params()
        denoiser = self.family.denoiser
        self.denoiser = self.trained[denoiser].forward if denoiser in self.trained else self.parts.denoiser
        # a ControlNet adapts the denoiser's call (Family.control_residuals), trained or frozen
        self.controlnet = (self.trained["controlnet"].forward if "controlnet" in self.trained
                           else self.parts.components.get("controlnet"))
        for index, part in enumerate(self.family.text_encoders):
            if part in self.trained:
                self.conditioner.set_text_encoder(self.trained[part].forward, index)
        if self.extras.compile is not None:  # in place: the prepared wrapper calls it, checkpoint keys stay the same
            compile_denoiser(self.parts.denoiser, self.extras.compile, self.batch_shapes)

    def _drop_group_params(self) -> None:
        """Before FSDP2 shards the model: fully_shard moves each whole parameter to the device, then keeps a shard of
        it; a reference held here would keep the whole tensor there too (accelerate drops the optimizer's likewise)."""
        for group in self.groups:
            if isinstance(group, FinetuneGroup):
                group.named_params = dict.fromkeys(group.named_params)
            else:
                group.params.clear()

    def _follow_sharded_params(self) -> None:
        """FSDP2 replaced the trained model's parameters by sharded ones (accelerate handed those to the optimizer,
        in the same order): the groups follow, so clipping, parameter counts and checkpoints read what trains."""
        for group, param_group in zip(self.groups, self.optimizer.param_groups, strict=True):
            sharded = list(param_group["params"])
            if isinstance(group, FinetuneGroup):
                group.named_params = dict(zip(group.named_params, sharded, strict=True))
            else:
                group.params[:] = sharded

    def _restore_weights(self, step: int) -> None:
        """The trained weights of the state's step, into this run's plain (not yet wrapped) models."""
        for part, trained in self.trained.items():
            if trained.lora_specs or trained.finetune_groups:
                self.load_trained_weights(part, self.ckpt_dir / f"{part}-{step}.safetensors")
        load_embedding_checkpoints(self.embedding_groups, self.ckpt_dir, step)

    def _restore(self, state: dict) -> None:
        """Continue from a saved state (its weights are back already): optimizer, lr schedule, step, data positions,
        RNG."""
        step = int(state["step"])
        if step >= self.train_steps:  # train_epochs decides the length: known only now that the data is built
            raise ConfigError(f"train.resume: the state is at step {step} and train.train_epochs="
                              f"{self.train_spec.train_epochs} gives {self.train_steps} steps, so there is nothing to "
                              "train; raise train.train_epochs")
        rng_states = state["rng"]
        if len(rng_states) != self.accelerator.num_processes:
            raise ConfigError(f"train.resume: the state was saved by {len(rng_states)} processes, "
                              f"this run has {self.accelerator.num_processes}")
        try:
            if self.fsdp:
                load_whole_optimizer_state(self.sharded_model(), self.optimizer.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            for stream, stream_state in zip(self.streams, state["streams"], strict=True):
                stream.restore(stream_state)
            set_rng_state(rng_states[self.accelerator.process_index])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            # A state of another config (other groups or datasets) or a hand-edited one: name the file, not a traceback.
            reason = str(err).splitlines()[0] if str(err) else "a bad value"
            raise ConfigError(f"train.resume: '{self.exp_dir / 'state' / f'step-{step}.pt'}' does not fit this run "
                              f"({type(err).__name__}: {reason})") from err
        self.global_step = step
        logger.info("resumed %s at step %d", self.exp_dir, step)

    def _log_start(self) -> None:
        logger.info("experiment folder: %s", self.exp_dir)
        logger.info("model: %s (%s), pixel step %d", self.parts.name_or_path, self.family.description,
                    self.parts.pixel_step)
        for warning in self.family.run_warnings(self.parts.noise_scheduler):  # a distilled checkpoint, ...
            logger.warning(warning)
        for warning in self.family.pipeline_warnings(self.parts.pipeline_settings):  # ... told by model_index.json
            logger.warning(warning)
        if (expert := self.parts.expert) is not None:
            others = ", ".join(self.parts.expert_loaders)
            logger.info("model.expert: the %s expert (%s) trains on sigmas [%g, %g%s; the other expert (%s) is not "
                        "loaded (previews load it for each render)", expert.name, expert.folder, expert.sigma_min,
                        expert.sigma_max, "]" if expert.sigma_max >= 1.0 else ")", others)
        if not self.writes_resume_state:
            logger.info("%s: checkpoints are written, resumable state files are not (sharded optimizer state)",
                        self.accelerator.distributed_type.value)
        if self.fsdp:
            (part,) = self.trained
            params = list(self.sharded_model().parameters())
            logger.info("FSDP2: the %s's weights, gradients and optimizer state are sharded over %d processes (this "
                        "one holds %d of its %d parameters)", part, self.accelerator.num_processes,
                        sum(local_numel(p) for p in params), sum(p.numel() for p in params))
        logger.info("training %d optimizer steps, total batch size %d (batch %d x accumulation %d x processes %d)",
                    self.train_steps, self.total_batch_size, self.batch_size,
                    self.train_spec.gradient_accumulation_steps, self.accelerator.num_processes)
        for label, group, param_group in zip(self.group_labels, self.groups, self.optimizer.param_groups):
            n_params = sum(param_count(p) for p in group.params)
            lr = param_group.get("initial_lr", param_group["lr"])  # before warm-up scales it
            logger.info("group %s: lr %.3g (effective), %d layers, %d trainable parameters",
                        label, lr, len(group.layers), n_params)
        swapped = f", {self.model_spec.blocks_to_swap} denoiser blocks swap in from CPU" if self.block_swapper else ""
        logger.info("model memory%s:\n%s", swapped, memory_table(self.parts.components))

    # ----------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        """Run optimizer steps until train_steps, logging and saving checkpoints on the way."""
        self.training_started = True
        trained_modules = [trained.forward for trained in self.trained.values()]
        for module in trained_modules:
            module.train()
        batch_iters = [stream.batches() for stream in self.streams]
        # redrawn at most twice a second: a redraw per step is a terminal write per step on fast steps
        progress = tqdm(total=self.train_steps, initial=self.global_step, desc="train", mininterval=0.5,
                        disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        try:
            with StopSignals() as stop:
                self._train_loop(stop, batch_iters, trained_modules, progress)
        except torch.OutOfMemoryError:  # one line naming the step and what would help, not a traceback
            raise self._out_of_memory() from None
        finally:
            progress.close()

    def _train_loop(self, stop: StopSignals, batch_iters: list, trained_modules: list, progress: tqdm) -> None:
        accelerator, spec = self.accelerator, self.train_spec
        params = self.trained_params()  # built once: the optimizer updates these same tensors in place
        # The micro-steps' losses are summed on the device and read (a host sync) on log steps only; fp64 sums them
        # exactly as Python's float sum of `.item()` values did (MPS has no fp64).
        loss_sum = torch.zeros((), device=accelerator.device,
                               dtype=torch.float32 if accelerator.device.type == "mps" else torch.float64)
        loss_count, last_log_time = 0, time.perf_counter()
        while self.global_step < self.train_steps:
            with accelerator.accumulate(*trained_modules):
                loss = sum(self.compute_loss(next(it), stream.loss_weight, stream.noise_salt)
                           for it, stream in zip(batch_iters, self.streams))
                accelerator.backward(loss)
                if accelerator.sync_gradients and spec.max_grad_norm:
                    accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            self.lr_scheduler.step()
            self.global_step += 1
            if self.ema is not None:
                self.ema.update()
            progress.update(1)
            if self.global_step % spec.log_step == 0 or self.global_step == self.train_steps:
                mean_loss = loss_sum.item() / loss_count  # waits for the device: the step times below are real
                now = time.perf_counter()
                step_time = (now - last_log_time) / spec.log_step
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                self.log_metrics(mean_loss, step_time)
                loss_sum.zero_()
                loss_count, last_log_time = 0, now
            saved = self.global_step % spec.save_step == 0 or self.global_step == self.train_steps
            if saved:
                self.save_checkpoint()
            if self.preview_spec is not None and (
                    self.global_step % self.preview_spec.step == 0 or self.global_step == self.train_steps):
                self.render_previews()
            if self.stop_requested(stop):
                if not saved:
                    self.save_checkpoint()
                raise TrainingInterrupted(stop.requested or 2, self.global_step, str(self.exp_dir))

    def _out_of_memory(self) -> Exception:
        spec = self.model_spec
        options = lowering_options(
            checkpointing=spec.gradient_checkpointing, blocks_to_swap=spec.blocks_to_swap,
            swappable=len(self.family.swappable_blocks(self.parts.denoiser)), batch_size=self.batch_size,
            latents_cached=all(isinstance(stream.loader.dataset, CachedLatentDataset) for stream in self.streams))
        return out_of_memory(self.global_step + 1, self.accelerator.device, options)

    def compute_loss(self, batch: dict, loss_weight: float, noise_salt: int = 0) -> torch.Tensor:
        """Noise one batch's latents as the family's objective says and score the denoiser's prediction."""
        device = self.accelerator.device
        batch = batch_on_device(batch, device)
        generators = self.sample_generators(batch, noise_salt)
        if "latents" in batch:  # from a latent cache
            latents = batch["latents"]
        else:
            latents = self.encode_latents(batch["pixel_values"], generators)
        noised = self.objective.noised(latents, generators)
        with self.accelerator.autocast():
            with torch.set_grad_enabled(any(part in self.trained for part in self.family.text_encoders)):
                conditioning = self.conditioner(batch["prompts"], batch, device)
            offload = self.model_spec.gradient_checkpointing == "offload"
            noisy_latents = noised.noisy_latents.to(self.weight_dtype)
            conditioning = cast_floats(conditioning, self.weight_dtype)
            if self.controlnet is not None:
                control = floats_on_device(batch["condition_pixels"][:, 0], device)  # in [-1, 1]
                conditioning.update(self.family.control_residuals(
                    self.controlnet, noisy_latents, noised.timesteps, conditioning, control))
            with activations_offloaded(self.parts.denoiser, device) if offload else nullcontext():
                prediction = self.family.denoise(self.denoiser, noisy_latents, noised.timesteps, conditioning)
        return self.objective.loss(prediction, noised) * loss_weight

    def sample_generators(self, batch: dict, noise_salt: int = 0) -> list[torch.Generator] | None:
        """One random generator per sample, seeded by the sample's `noise_seed` (its dataset index and epoch) and its
        dataset's salt: a sample's posterior draw, noise and timestep are then the same whatever batch or process it
        lands in, so N processes train what one process with N times the batch trains. None: the global stream."""
        seeds = batch.get("noise_seed")
        if seeds is None:
            return None
        device = self.accelerator.device
        return [torch.Generator(device=device).manual_seed(seed ^ noise_salt) for seed in seeds]

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor,
                       generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents sampled from the VAE posterior, scaled and shifted (fp32)."""
        mean, std = self.encode_latent_dist(pixel_values)
        return mean + std * sample_noise(mean, 0.0, generators)

    @torch.no_grad()
    def encode_latent_dist(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> the VAE posterior's (mean, std), scaled like encode_latents (fp32)."""
        return self.family.encode_latent_dist(self.parts.vae, pixel_values.to(self.accelerator.device))

    def load_trained_weights(self, part: str, path: Path) -> None:
        """Put a saved checkpoint's LoRA weights and fully trained tensors back into this run's part."""
        lora, full, _ = load_checkpoint(path)
        trained = self.trained[part]
        if trained.lora_specs:
            load_lora_into(trained.module, lora)
        load_finetuned(trained.finetune_groups, full, str(path))

    def checkpoint_state(self, part: str) -> dict[str, torch.Tensor]:
        """What a checkpoint of `part` holds: LoRA weights by layer, fine-tuned tensors by parameter name. Under FSDP
        every process calls it (the sharded tensors are gathered) and the main process gets them."""
        trained = self.trained[part]
        state = lora_state_dict(self.accelerator.unwrap_model(trained.forward)) if trained.lora_specs else {}
        state = {**state, **finetuned_state(trained.finetune_groups)}
        return gathered_state(state, keep=self.accelerator.is_main_process) if self.fsdp else state

    def sharded_model(self) -> torch.nn.Module:
        """The one model an FSDP run trains, as accelerate prepared (sharded) it."""
        (trained,) = self.trained.values()
        return trained.forward

    def stop_requested(self, stop: StopSignals) -> bool:
        """Whether any process got SIGINT / SIGTERM; all processes agree, so they stop at the same step."""
        if self.accelerator.num_processes == 1:
            return stop.requested is not None
        flag = torch.tensor([0 if stop.requested is None else stop.requested], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        if stop.requested is None and int(flag) > 0:
            stop.requested = 2  # another process was signalled; SIGINT is the usual one
        return int(flag) > 0

    def trained_params(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer updates."""
        return [p for group in self.groups for p in group.params]

    def log_metrics(self, loss: float, step_time: float) -> None:
        """Loss (raw and smoothed), learning rates, speed and peak memory to train.log and the trackers."""
        lrs = {f"lr/{label}": g["lr"] for label, g in zip(self.group_labels, self.optimizer.param_groups)}
        smoothed = self.smoothed_loss.update(loss)
        images_per_s = self.total_batch_size / step_time if step_time > 0 else 0.0
        peak_mib, rss_mib = peak_memory_mib(self.accelerator.device), peak_rss_mib()
        values = {"loss": loss, "loss_smoothed": smoothed, "step_time_s": step_time, "images_per_s": images_per_s,
                  "peak_memory_mib": peak_mib, "peak_rss_mib": rss_mib, **lrs}
        if self.accelerator.is_main_process:
            for tracker in [self.tracker, *self.extra_trackers]:
                tracker.log(values, step=self.global_step)
            lr_text = ", ".join(f"{k[3:]}={v:.3g}" for k, v in lrs.items())
            logging.getLogger("hcpdiff.train.log").info(
                "step %d/%d loss %.5f (smoothed %.5f) %s %.3f s/step %.2f img/s peak mem %.0f MiB peak RSS %.0f MiB",
                self.global_step, self.train_steps, loss, smoothed, lr_text, step_time, images_per_s, peak_mib, rss_mib)

    def _setup_extras(self) -> None:
        """EMA shadows, the preview pipeline's settings, extra trackers (the objective is built with the models)."""
        self.smoothed_loss = SmoothedValue(0.9)
        self.ema = EmaWeights(self.trained_params(), self.extras.ema.decay) if self.extras.ema else None
        resumed = getattr(self, "resume_state", None)
        if self.ema is not None and resumed is not None:  # go on averaging from the saved averages, not from scratch
            with self.ema.swapped_in():
                for part in self.trained:
                    ema_file = self.ckpt_dir / f"{part}-ema-{int(resumed['step'])}.safetensors"
                    if ema_file.exists():
                        self.load_trained_weights(part, ema_file)
                self.ema.copy_from_params()
        self.preview_spec = self.extras.preview
        self.extra_trackers = []
        if "wandb" in self.extras.log_with and self.accelerator.is_main_process:
            self.extra_trackers.append(start_wandb(self.exp_dir, OmegaConf.to_container(self.cfg, resolve=True)))

    def render_previews(self) -> list[Path]:
        """Render the previewer's prompts with the current (adapter-active) weights; main process only.

        Random states and the models' train mode are put back, so training goes on exactly as without previews.
        """
        if not self.accelerator.is_main_process:
            return []
        current = {**self.parts.components, **{part: self.accelerator.unwrap_model(trained.forward)
                                               for part, trained in self.trained.items()}}
        # a model with denoising experts renders with all of them: the others load for the render alone
        with render_components(self.parts, current, self.accelerator.device, self.weight_dtype) as components:
            modes = [(module, module.training) for module in components.values()
                     if isinstance(module, torch.nn.Module)]
            pipe = preview_pipeline(self.parts, components, self.objective)
            try:
                for module, _ in modes:
                    module.eval()
                # a compiled denoiser renders as plain eager code: no graphs for the previews' shapes and modes
                with eager(), torch.no_grad(), self.accelerator.autocast(), on_device(
                        self.parts.vae, self.accelerator.device, self.vae_parked):
                    images = render_previews(pipe, self.family, self.preview_spec, self.model_spec.clip_skip,
                                             self.preview_prompt_args)
            finally:
                for module, training in modes:
                    module.train(training)
            del pipe
        writer = getattr(self.tracker, "writer", None)
        paths = save_previews(images, self.exp_dir / "preview", self.global_step, writer, spec=self.preview_spec,
                              fps=self.family.video_fps)
        logger.info("step %d: %d preview images in %s", self.global_step, len(paths), self.exp_dir / "preview")
        return paths

    # ----------------------------------------------------------------------------------------------- outputs
    def save_checkpoint(self) -> list[Path]:
        """Write each trained part's LoRA and fine-tuned tensors as `ckpts/<part>-<step>.safetensors` (main
        process, atomic)."""
        self.accelerator.wait_for_everyone()
        written = []
        # Under ZeRO-3 and FSDP every process takes part in gathering the trained weights; the main one writes them.
        main = self.accelerator.is_main_process
        with gathered_for_saving(self.trained_params(), self.deepspeed_config):
            for part, trained in self.trained.items():
                if not (trained.lora_specs or trained.finetune_groups):  # trains only embeddings' vectors
                    continue
                # under FSDP every process takes part in gathering the state (ZeRO-3's gathering is the context's)
                state = self.checkpoint_state(part) if main or self.fsdp else None
                if not main:
                    continue
                metadata = lora_metadata(part, str(self.parts.name_or_path), trained.lora_groups,
                                         self.global_step, family=self.family.name,
                                         finetune=trained.finetune_groups)
                metadata.update(checkpoint_metadata(part, trained.module, getattr(self, "controlnet_base", None)))
                if part == self.family.denoiser and self.parts.expert is not None:  # renders route it by this
                    metadata.update(expert=self.parts.expert.name, expert_folder=self.parts.expert.folder)
                path = self.ckpt_dir / f"{part}-{self.global_step}.safetensors"
                save_lora(path, state, metadata)
                written.append(path)
                if self.ema is not None:  # the averaged weights, in the same format beside the raw ones
                    ema_path = self.ckpt_dir / f"{part}-ema-{self.global_step}.safetensors"
                    with self.ema.swapped_in():
                        save_lora(ema_path, self.checkpoint_state(part), {**metadata, "ema_decay": str(self.ema.decay)})
                    written.append(ema_path)
            if main:
                written += save_embedding_checkpoints(self.embedding_groups, self.ckpt_dir, self.global_step,
                                                      {"base_model": str(self.parts.name_or_path),
                                                       "family": self.family.name})
        self.save_resume_state(written)
        return written

    def save_resume_state(self, checkpoint_files: list[Path]) -> None:
        """Write state/step-<N>.pt (optimizer, schedule, data positions, every process's RNG); prune old steps."""
        if not self.writes_resume_state:
            return
        rng_states = [rng_state()]
        if self.accelerator.num_processes > 1:
            rng_states = gather_object(rng_states)
        optimizer_state = (whole_optimizer_state(self.sharded_model(), self.optimizer.optimizer) if self.fsdp
                           else None)  # under FSDP every process takes part in gathering it
        if not self.accelerator.is_main_process:
            return
        state = {
            "step": self.global_step,
            "optimizer": optimizer_state if self.fsdp else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "streams": [stream.state() for stream in self.streams],
            "rng": rng_states,
        }
        save_state(self.exp_dir / "state" / f"step-{self.global_step}.pt", state, checkpoint_files)
        if self.train_spec.ckpt_keep:
            prune_checkpoints(self.exp_dir, self.train_spec.ckpt_keep, up_to=self.global_step)

    def cleanup(self, failed: bool = False) -> None:
        """Release everything the run holds, after success or failure: trackers, the process group, the folder's lock
        (and the folder itself when this run created it and failed in set-up, before any output).

        Every release is tried even when one before it fails (a set-up cut short leaves parts half-built), the lock's
        above all; the first failure is raised afterwards."""
        with ExitStack() as releases:  # callbacks run last-in first-out: the lock is let go last, whatever happened
            releases.callback(self._release_exp_dir, failed)
            releases.callback(self._close_log_handler)
            if not failed:
                releases.callback(logger.info, "done: %s", self.exp_dir)
            accelerator = getattr(self, "accelerator", None)
            if accelerator is not None:
                releases.callback(accelerator.end_training)  # destroys the process group (torch.distributed), if any
                releases.callback(self._release_models)
                if not failed and accelerator.num_processes > 1:
                    # no process tears down gloo while another still talks to it
                    releases.callback(accelerator.wait_for_everyone)
            for tracker in reversed(getattr(self, "extra_trackers", [])):
                releases.callback(tracker.finish)
            if getattr(self, "tracker", None) is not None:
                releases.callback(self.tracker.finish)

    def _close_log_handler(self) -> None:
        handler = getattr(self, "log_handler", None)
        if handler is not None:
            for name in ("hcpdiff", "hcpdiff.train.log"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()

    def _release_exp_dir(self, failed: bool) -> None:
        lock = getattr(self, "exp_lock", None)
        if lock is not None:
            unlock_exp_dir(lock)
            # Only a failed set-up leaves a folder of no use; once training ran, its train.log tells what happened.
            if failed and self.created_exp_dir and not self.training_started and remove_if_no_outputs(lock.parent):
                logger.info("removed %s: the run failed before training", lock.parent)

    def _release_models(self) -> None:
        """Drop this run's references to the wrapped (DDP) models and optimizer, so their hold on the process group
        ends here, before it is destroyed, and not in a destructor at interpreter exit (a gloo hang seen in tests)."""
        self.accelerator.free_memory()
        for trained in getattr(self, "trained", {}).values():
            trained.forward = None
        self.__dict__.pop("denoiser", None)
        self.__dict__.pop("controlnet", None)
        self.__dict__.pop("optimizer", None)
        self.__dict__.pop("conditioner", None)  # it holds the trained text encoders' wrappers
        gc.collect()
