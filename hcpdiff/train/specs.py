"""Typed views of the config sections the trainer reads; each field documents its key in train_base.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Iterable, Literal

from hcpdiff.config.fields import Bound, read_fields

COUNT = Bound(ge=1)  # steps, epochs, intervals: a zero would divide by zero or never happen, a negative means nothing


@dataclass
class SchedulerSpec:
    """`train.scheduler`: the learning-rate schedule, stepped once per optimizer step."""

    name: str = "constant_with_warmup"  # any name diffusers.optimization.get_scheduler knows
    num_warmup_steps: Annotated[int, Bound(ge=0)] = 0  # optimizer steps of linear warm-up from 0
    scheduler_kwargs: dict = field(default_factory=dict)  # extra arguments: num_cycles, power, step_rules


@dataclass
class TrainSpec:
    """`train`: length of the run, batching, optimizer and checkpoints."""

    train_steps: Annotated[int | None, COUNT] = 1000  # optimizer steps (not micro-batches)
    train_epochs: Annotated[int | None, COUNT] = None  # passes over dataset1; when set it decides the length, not train_steps
    gradient_accumulation_steps: Annotated[int, COUNT] = 1  # micro-batches per optimizer step
    workers: Annotated[int, Bound(ge=0)] = 2  # data-loader worker processes per dataset (0: load in the training process)
    # a negative norm would flip every gradient (clip_grad_norm_ scales by max_norm / norm): gradient ascent
    max_grad_norm: Annotated[float | None, Bound(ge=0, finite=True, note="0 or null: no clipping")] = 1.0
    save_step: Annotated[int, COUNT] = 100  # write a checkpoint every N optimizer steps (and at the end)
    log_step: Annotated[int, COUNT] = 10  # log loss and learning rates every N optimizer steps
    scale_lr: bool = False  # multiply every group's lr by the total batch size
    resume: str | None = None  # experiment folder (newest intact state) or one state/step-<N>.pt to continue from
    resume_overwrite: bool = False  # resuming a named earlier state deletes the folder's later steps (else refused)
    ckpt_keep: int | None = None  # keep only the newest N checkpoints (and states) of this run; null keeps all
    optimizer: Any = None  # a `_target_` + `_partial_: true` node; receives the param groups
    scheduler: Any = None  # see SchedulerSpec
    loss: Any = None  # see LossSpec
    guidance: float = 1.0  # the guidance embedding's value while training (FLUX-dev); models without one ignore it
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # trackers: tensorboard (always), wandb
    compile: Any = False  # false | true | {mode, dynamic, fullgraph}: torch.compile the denoiser (see CompileSpec)


@dataclass
class RunSpec:
    """The top level of a training config (besides `lora_<part>` / `<part>:` groups and `<part>_lr` variables)."""

    exp_dir: str | None = None  # experiment folder; an existing one is never reused (-1, -2 ... suffix)
    seed: int = 0  # seeds python, numpy and torch, and the data order
    # what accelerate does with these on our code paths is tested; its fp8 needs extra engines and a recent GPU
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # null / no: fp32
    allow_tf32: bool = True  # TF32 matmuls on Ampere and newer GPUs
    model: Any = None  # see ModelSpec
    train: Any = None  # see TrainSpec
    data: Any = None  # datasets by name
    previewer: Any = None  # see PreviewSpec
    embeddings: Any = None  # prompt embeddings to train: {emb_dir, train: [{name, lr}]} (hcpdiff/train/embeddings.py)
    tokenizer_pt: Any = None  # HCP-Diffusion v1's spelling of `embeddings`


RUN_SCALARS = ("exp_dir", "seed", "mixed_precision", "allow_tf32")  # read through RunSpec; the sections have specs


def top_level_keys(parts: Iterable[str]) -> set[str]:
    """Every key a training config may set at its top level, for models with these trainable parts."""
    part_keys = {key for part in parts for key in (f"lora_{part}", part, f"{part}_lr")}
    return {f.name for f in fields(RunSpec)} | part_keys


@dataclass
class ModelSpec:
    """`model`: the base model and how prompts are encoded."""

    pretrained_model_name_or_path: str | None = None  # diffusers folder or hub id
    revision: str | None = None  # hub revision (branch, tag or commit)
    single_file_config: str | None = None  # diffusers folder giving the part configs of a single .safetensors/.ckpt
    tokenizer_repeats: int = 1  # prompt length in 75-token chunks, encoded separately and concatenated
    clip_skip: int = 0  # 0: last text-encoder layer; 1: penultimate (a1111's "clip skip 2"); ...
    max_sequence_length: Annotated[int | None, Bound(ge=1)] = None  # T5 tokens; null: FLUX 512 dev / 256 schnell, SD3 256
    drop_t5: bool = False  # SD3: leave the T5 encoder unloaded; its place in the text sequence is zeros (as diffusers)
    # a model whose denoisers split the steps by noise level (Wan2.2 A14B: high_noise | low_noise): the expert to train,
    # loaded alone as the denoiser, on sigmas of its range only; null for a model with one denoiser
    expert: str | None = None
    # an editing model's input-image area in pixels while training, at the image's aspect ratio; null: its pipeline's
    # (Qwen-Image-Edit: 1024*1024). Renders always use the pipeline's: lower trains faster, less like it renders
    condition_area: Annotated[int | None, Bound(ge=1)] = None
    # trade compute for memory in the denoiser (and a trained text encoder); offload: also keep the checkpointed
    # blocks' inputs in CPU memory until backward; {blocks: N}: only the transformer's first N blocks
    gradient_checkpointing: bool | Literal["offload"] | dict = False
    blocks_to_swap: Annotated[int, Bound(ge=0, note="0: off")] = 0  # transformer blocks kept in CPU memory, copied in to run
    # part -> int8 | fp8 | nf4: store that part's frozen Linear weights quantized (torchao); LoRAs stay in full precision
    quantize: dict = field(default_factory=dict)
    preset_lora: list = field(default_factory=list)  # [{path, alpha}]: native LoRAs fused into the base before training
    init_lora: dict = field(default_factory=dict)  # {unet: path, text_encoder: path}: adapters start from these weights
    ema: Any = None  # null, or {decay: 0.999}: see EmaSpec
    # a ControlNet steering the denoiser (SD, SDXL): `unet` for a new one from the U-Net's weights, `new` for a new
    # randomly initialised one of the U-Net's architecture, or a diffusers
    # ControlNet folder / single file / controlnet-<step>.safetensors to continue; `controlnet:` / `lora_controlnet`
    # groups train it, each source's condition_column gives the control images
    controlnet: str | None = None


@dataclass
class LossSpec:
    """`train.loss`: how latents are noised and how the denoiser's error is weighted. The defaults change nothing.

    The first eight keys are the DDPM objective's (SD, SDXL), the rest the flow-matching objective's (FLUX, SD3);
    setting a key of the other objective than the model trains with is one error.
    """

    noise_offset: float = 0.0  # add offset * randn(B, C, 1, 1) to the noise (0.05-0.1 helps very dark / light images)
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5 is the paper's value); null: plain mean
    prediction_type: str | None = None  # epsilon | v_prediction | sample; null: the model's scheduler config
    timestep_min: int = 0  # timesteps are drawn from [timestep_min, timestep_max)
    timestep_max: int | None = None  # null: the scheduler's num_train_timesteps (1000 for SD)
    # pyramid (multi-resolution) noise, HCP v1's PyramidNoiseScheduler / kohya's multires noise: 0 (or 1) off, 6-10 on
    pyramid_noise_levels: Annotated[int, Bound(ge=0, note="0: off")] = 0
    pyramid_noise_discount: Annotated[float, Bound(gt=0, finite=True)] = 0.4  # level i's field weighs discount ** i
    # rescale the betas to zero terminal SNR (the last timestep pure noise); needs v_prediction (Lin et al. 2024)
    zero_terminal_snr: bool = False
    sigma_sampling: str | None = None  # uniform | logit_normal | mode | sigmoid; null: logit_normal
    logit_mean: float | None = None  # logit_normal: mean of the normal before the sigmoid (null: 0)
    logit_std: float | None = None  # logit_normal: its std (null: 1)
    mode_scale: float | None = None  # mode: SD3's mode-sampling scale (null: 1.29)
    sigmoid_scale: float | None = None  # sigmoid: sigma = sigmoid(scale * randn) (null: 1)
    # none | static | resolution (FLUX inference's shift for the image's token count, from the scheduler config);
    # null: resolution when the scheduler shifts dynamically (FLUX-dev), else static at its shift (schnell: 1)
    shift: str | None = None
    shift_value: float | None = None  # static: sigma' = v * s / (1 + (v - 1) * s) (3.0 is SD3's)
    weighting: str | None = None  # none | sigma_sqrt | cosmap (SD3 paper's loss weights); null: none
    # score x0 = x_t - sigma * prediction against the clean latents (diffusers' SD3 --precondition_outputs)
    precondition_outputs: bool = False


@dataclass
class EmaSpec:
    """`model.ema`: an exponential moving average of the trained weights, saved as `<part>-ema-<step>.safetensors`."""

    decay: float = 0.999  # shadow = decay * shadow + (1 - decay) * weights, after every optimizer step


@dataclass
class CheckpointBlocksSpec:
    """`model.gradient_checkpointing: {blocks: N}`: checkpoint the denoiser's first N transformer blocks only."""

    blocks: Annotated[int, Bound(ge=1)]


def checkpointed_block_count(model: ModelSpec) -> int | None:
    """N of `model.gradient_checkpointing: {blocks: N}`, None for the other settings; bad keys are one ConfigError."""
    if not isinstance(model.gradient_checkpointing, dict):
        return None
    return read_fields(model.gradient_checkpointing, "model.gradient_checkpointing", CheckpointBlocksSpec).blocks
