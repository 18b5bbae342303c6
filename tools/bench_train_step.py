"""Steady-state ms per optimizer step: hcpdiff's trainer against a bare diffusers + peft loop.

Both run in this process on the same model, batch size, image size and LoRA layers (SD: rank 8 on to_q, to_k,
to_v, to_out.0; FLUX, SD3, Qwen-Image: the shipped lora_<family>.yaml transformer group), the bare loop encoding
images with the VAE and prompts with the text encoder(s) every step, with the pipeline's own encode_prompt and packing
(tools/bench_flow.py). Blocks of steps alternate between the two so drift in machine load hits both alike; the median
block is reported. The trainer runs with its caches off (as the bare loop), or with `--caches` (latent + text cache
on; the flow-matching families then release their text encoders).

    python tools/bench_train_step.py                              # tiny model, 256 px, batch 2, CPU
    python tools/bench_train_step.py --model PATH --size 512 --batch 8 --mixed_precision bf16   # on a GPU
    python tools/bench_train_step.py --sd15-unet --size 512 --batch 1 --mixed_precision bf16     # SD1.5-shaped U-Net, random weights
    python tools/bench_train_step.py --family flux [--caches]     # tiny FLUX.1-dev, 256 px, batch 2
    python tools/bench_train_step.py --family sd3|qwen_image|z_image|krea2|qwen_image_21|wan|flux2_dev [--caches]   # tiny
        # SD3 (with T5) / Qwen-Image / Z-Image / Krea 2 / Qwen-Image 2.1 / Wan (images as 1-frame clips) / FLUX.2 [dev]
    python tools/bench_train_step.py --family wan2.2-a14b     # tiny Wan2.2 A14B: its high-noise expert alone
    python tools/bench_train_step.py --family flux_kontext|qwen_image_edit|qwen_image_edit_plus [--condition_area 16384]
        # the editing families on (input image, instruction, image) rows, the input images at that area in both loops
    python tools/bench_train_step.py --family ideogram4 [--max_sequence_length 64]   # tiny Ideogram 4: the bare loop
        # pads text to max_sequence_length (the pipeline's 2048 by default), the trainer to each batch's longest
    python tools/bench_train_step.py --family flux --flux-full-width --size 512 --batch 1 --mixed_precision bf16
        # FLUX.1's width (3072), 1 double + 1 single block, random weights: s/step and peak RSS, each loop in its own
        # process (so each peak is its own); blocks cannot alternate there
    python tools/bench_train_step.py ... --compile     # both denoisers torch.compiled (the trainer: train.compile)

The timed blocks hold steady-state optimizer steps only: the trainer's blocks are consecutive stretches of one run of
its loop (the loop's start and its end-of-run log fall in untimed steps around them; the end-of-run checkpoint is not
written, BenchTrainer), each followed by a bare block, and its data loader runs `--workers` processes (the trainer's
default, 2). Besides the medians, the fastest trainer block against the fastest bare block: what a step costs when
nothing else on the machine got in its way. On a GPU it also prints the model FLOPs of one step
(torch.utils.flop_counter over the bare step: VAE and text encoding, denoiser forward and backward), each loop's MFU
against the GPU's dense bf16 peak (a table, or --peak-tflops), peak GPU memory, and how many host syncs a block of
trainer steps makes (torch.cuda.set_sync_debug_mode; the block's last step logs, which is one).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hcpdiff.config import load_config  # noqa: E402
from hcpdiff.families import tiny_variant_family  # noqa: E402
from hcpdiff.models import load_model_parts  # noqa: E402
from hcpdiff.tools.make_demo_data import family_dataset  # noqa: E402
from hcpdiff.tools.make_tiny_model import make_tiny_model  # noqa: E402
from hcpdiff.train.run import quiet_libraries  # noqa: E402
from hcpdiff.train.streams import received  # noqa: E402
from hcpdiff.train.trainer import Trainer  # noqa: E402
from hcpdiff.train.transfer import batch_on_device  # noqa: E402

LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]
# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(); first match wins
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("4090", 165.2))
FLOW_FAMILIES = ("flux", "sd3", "qwen_image", "z_image", "krea2", "ideogram4", "qwen_image_21", "wan",
                 "wan2.2-a14b", "flux2_dev", "flux2_klein", "flux_kontext", "qwen_image_edit",
                 "qwen_image_edit_plus")  # bench_flow's loops (wan2.2-a14b: the high-noise expert)
CONDITION_AREA = 128 * 128  # an editing family's input-image area (model.condition_area) unless --condition_area


def default_sequence_length(family: str) -> int:
    """The prompt tokens a flow-matching family trains with by default (model.max_sequence_length: null)."""
    from hcpdiff.families import flux, flux2, ideogram4, krea2, qwen_image, sd3, wan, z_image

    return {"flux": flux.DEV_MAX_SEQUENCE_LENGTH, "sd3": sd3.MAX_SEQUENCE_LENGTH,
            "qwen_image": qwen_image.MAX_SEQUENCE_LENGTH, "z_image": z_image.MAX_SEQUENCE_LENGTH,
            "krea2": krea2.MAX_SEQUENCE_LENGTH, "ideogram4": ideogram4.MAX_SEQUENCE_LENGTH,
            "qwen_image_21": qwen_image.MAX_SEQUENCE_LENGTH,  # 2.1: not cut (the key is ignored)
            "wan": wan.MAX_SEQUENCE_LENGTH, "wan2.2-a14b": wan.MAX_SEQUENCE_LENGTH,
            "flux2_dev": flux2.MAX_SEQUENCE_LENGTH, "flux2_klein": flux2.MAX_SEQUENCE_LENGTH,
            "flux_kontext": flux.DEV_MAX_SEQUENCE_LENGTH,
            # Qwen-Image-Edit (Plus): not cut (the key is ignored)
            "qwen_image_edit": qwen_image.MAX_SEQUENCE_LENGTH, "qwen_image_edit_plus": qwen_image.MAX_SEQUENCE_LENGTH,
            }[family]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_sd15_shaped_model(out_dir: Path, tiny_dir: Path) -> Path:
    """The tiny pipeline with its U-Net swapped for one of SD1.5's architecture (random weights)."""
    from diffusers import UNet2DConditionModel
    import shutil

    shutil.copytree(tiny_dir, out_dir)
    text_width = load_model_parts(str(tiny_dir)).text_encoder.config.hidden_size
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=text_width)  # defaults are SD1.5's layout
    shutil.rmtree(out_dir / "unet")
    unet.save_pretrained(out_dir / "unet")
    return out_dir


class BareLoop:
    """The loop a diffusers training example writes: VAE encode, text encode, noise, U-Net, MSE, AdamW."""

    def __init__(self, model_dir: str, batch: dict, device: torch.device, dtype: torch.dtype, lr: float = 1e-4):
        from peft import LoraConfig

        parts = load_model_parts(model_dir)
        self.vae, self.text_encoder, self.tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
        self.unet, self.scheduler = parts.unet, parts.noise_scheduler
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=LAYERS, init_lora_weights="gaussian"))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for module in (self.vae, self.text_encoder, self.unet):
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            module.to(device)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        self.device, self.dtype = device, dtype
        self.pixel_values = batch["pixel_values"].to(device, dtype)
        self.prompts = batch["prompts"]

    def step(self) -> None:
        """One optimizer step."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad():
            latents = self.vae.encode(self.pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
            ids = self.tokenizer(self.prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            with autocast:
                embeds = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            pred = self.unet(noisy, timesteps, embeds).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class BenchTrainer(Trainer):
    """The trainer without the checkpoint it writes when a run ends (~60 ms on the tiny models: it belongs to
    save_step, not to the step time), and with a hook called after each optimizer step (`time_trainer_blocks`)."""

    after_step = None

    def save_checkpoint(self) -> list[Path]:
        return []

    def stop_requested(self, stop) -> bool:  # the loop asks once per optimizer step, after logging and saving
        if self.after_step is not None:
            self.after_step()
        return super().stop_requested(stop)


def bench_data(folder: Path, args) -> tuple[Path, list[str]]:
    """(the demo data folder, the overrides that point the trainer at it): captioned images, or for an editing family
    (input image, instruction, image) rows with the input images at --condition_area (make_demo_data's
    family_dataset, as the tests that run every family make them)."""
    return family_dataset(tiny_variant_family(args.family), folder, num=max(4, args.batch * 2),
                          condition_area=args.condition_area)


def build_trainer(model_dir: str, data_overrides: list[str], exp_root: Path, args) -> Trainer:
    """hcpdiff's trainer from demo_tiny.yaml (a flow-matching family: its shipped lora_<family>.yaml), pointed at the
    same model, data (bench_data's overrides), batch and layers."""
    caches = "true" if args.caches else "false"
    overrides = [
        f"model.pretrained_model_name_or_path={model_dir}", *data_overrides,
        "data.dataset1.source.data_source1.prompt_template=null",
        # off: both loops encode every step (tools/bench_cache.py measures what the caches save on SD)
        f"data.dataset1.cache_latents={caches}", f"data.dataset1.cache_text_embeds={caches}",
        f"data.dataset1.batch_size={args.batch}",
        f"data.dataset1.bucket={{_target_: hcpdiff.data.FixedBucket, _partial_: true, target_size: {args.size}}}",
        f"train.train_steps={args.warmup}", "train.save_step=1000000", "train.log_step=1000000",
        f"train.workers={args.workers}", f"exp_dir={exp_root / 'trainer'}",
        f"mixed_precision={args.mixed_precision or 'null'}", f"train.compile={'true' if args.compile else 'false'}",
    ]
    if args.family in FLOW_FAMILIES:  # the shipped transformer group as it is, at the bare loop's lr, no warm-up
        from bench_flow import shipped_config

        config = shipped_config(args.family)
        # the base unquantized and no checkpointing, as the bare loop (FLUX.2 [dev]'s config turns both on)
        overrides += ["transformer_lr=1e-4", "train.scheduler.num_warmup_steps=0",
                      f"model.max_sequence_length={args.max_sequence_length}", "model.quantize={}",
                      "model.gradient_checkpointing=false"]
    else:
        config = REPO_ROOT / "cfgs/train/examples/demo_tiny.yaml"
        overrides += ["lora_unet=[{lr: 1e-4, rank: 8, alpha: 8, layers: ['re:.*\\.(to_q|to_k|to_v|to_out\\.0)$']}]"]
    cfg = load_config(config, overrides)
    trainer = BenchTrainer(cfg, single_process=True)
    trainer.setup()
    return trainer


def time_trainer_blocks(trainer: BenchTrainer, steps: int, blocks: int, between=None) -> tuple[list[float], float]:
    """(seconds per step of each block, process CPU seconds of all blocks): `blocks` blocks of `steps` optimizer
    steps inside one run of the trainer's own loop, so every block is steady state: the loop's start (data iterators,
    progress bar) is in the untimed step before the first block, the end-of-run log in the untimed step after the last.
    `between()` runs after each block, untimed (the bare loop's block, so the two alternate under the same load)."""
    device = trainer.accelerator.device
    times, cpu, done = [], 0.0, 0
    start = cpu_start = 0.0

    def after_step() -> None:
        nonlocal done, start, cpu_start, cpu
        done += 1
        if len(times) == blocks:  # the untimed last step
            return
        if done > 1 and (done - 1) % steps == 0:  # a block ends
            sync(device)
            times.append((time.perf_counter() - start) / steps)
            cpu += time.process_time() - cpu_start
            if between is not None:
                between()
        if done == 1 or (done - 1) % steps == 0:  # a block starts
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()

    trainer.after_step = after_step
    trainer.train_steps = trainer.global_step + blocks * steps + 2
    try:
        trainer.train()
    finally:
        trainer.after_step = None
    return times, cpu


def time_bare_block(bare: BareLoop, steps: int) -> float:
    """Seconds per step for `steps` steps of the bare loop."""
    sync(bare.device)
    start = time.perf_counter()
    for _ in range(steps):
        bare.step()
    sync(bare.device)
    return (time.perf_counter() - start) / steps


def bare_loop(model_dir: str, data_dir: Path, device: torch.device, dtype: torch.dtype, args,
              sd_batch: dict | None = None) -> object:
    """The family's bare diffusers + peft loop: SD on the trainer's first batch, a flow-matching family on the first
    demo images; with --compile its denoiser compiled as the trainer's is (in place, one graph per shape)."""
    if args.family in FLOW_FAMILIES:
        from bench_flow import BARE_LOOPS, demo_batch

        bare = BARE_LOOPS[args.family](model_dir, demo_batch(data_dir, args.size, args.batch), device, dtype,
                                       max_sequence_length=args.max_sequence_length,
                                       condition_area=args.condition_area)
        denoiser = bare.transformer
    else:
        bare = BareLoop(model_dir, sd_batch, device, dtype)
        denoiser = bare.unet
    if args.compile:
        denoiser.compile(dynamic=False)
    return bare


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one_loop(args) -> None:
    """`--only trainer|bare`: time one loop in this process and print its result as one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir, data_overrides = bench_data(tmp / "data", args)
        if args.only == "trainer":
            trainer = build_trainer(args.model, data_overrides, tmp, args)
            trainer.train()  # warm-up steps
            times, _ = time_trainer_blocks(trainer, args.steps, args.blocks)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
            bare = bare_loop(args.model, data_dir, device, dtype, args)
            for _ in range(args.warmup):
                bare.step()
            times = [time_bare_block(bare, args.steps) for _ in range(args.blocks)]
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({"loop": args.only, "s_per_step": statistics.median(times),
                                  "blocks": times, "peak_rss_gib": peak_rss_gib(), "peak_gpu_gib": peak_gpu}))


def run_full_width(args) -> None:
    """FLUX at full width, reduced depth: build it once, then time each loop in its own process (its own peak RSS)."""
    from bench_flow import make_full_width_flux

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir = make_full_width_flux(Path(tmp) / "flux_full_width")
        print(f"built the full-width model in {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for loop in ("trainer", "bare"):
            command = [sys.executable, __file__, "--family", "flux", "--model", str(model_dir), "--only", loop,
                       "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--blocks", str(args.blocks), "--warmup", str(args.warmup), "--workers", str(args.workers),
                       "--max_sequence_length", str(args.max_sequence_length)]
            command += ["--mixed_precision", args.mixed_precision] if args.mixed_precision else []
            command += ["--caches"] if args.caches else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{loop} loop failed:\n{done.stderr[-3000:]}")
            line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
            results[loop] = json.loads(line[len("RESULT "):])
    print(f"FLUX full width (3072, 1 double + 1 single block, random weights)  {args.size}px  batch {args.batch}  "
          f"precision {args.mixed_precision or 'fp32'}  T5 length {args.max_sequence_length}  "
          f"caches {'on' if args.caches else 'off'}  {args.blocks} block(s) x {args.steps} step(s), own process each")
    for name, loop in (("hcpdiff trainer", "trainer"), ("bare diffusers+peft", "bare")):
        result = results[loop]
        line = f"{name:20s} {result['s_per_step']:8.2f} s/step  peak RSS {result['peak_rss_gib']:.2f} GiB"
        if result["peak_gpu_gib"] is not None:
            line += f"  peak GPU {result['peak_gpu_gib']:.2f} GiB"
        print(line)
    print(f"ratio trainer / bare: {results['trainer']['s_per_step'] / results['bare']['s_per_step']:.3f}  "
          f"(peak RSS {results['trainer']['peak_rss_gib'] / results['bare']['peak_rss_gib']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd", *FLOW_FAMILIES], default="sd")
    parser.add_argument("--model", help="diffusers folder (default: a tiny random model made here)")
    parser.add_argument("--sd15-unet", action="store_true", help="swap in a random SD1.5-architecture U-Net")
    parser.add_argument("--flux-full-width", action="store_true",
                        help="FLUX.1's width at 1 double + 1 single block, random weights; loops in own processes")
    parser.add_argument("--caches", action="store_true", help="the trainer caches latents and text (the bare loop "
                                                              "cannot)")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="flow-matching families: prompt tokens (T5's for FLUX / SD3); default the family's own "
                             "(FLUX.1-dev 512, SD3 256, Qwen-Image 512)")
    parser.add_argument("--condition_area", type=int, default=CONDITION_AREA,
                        help="editing families (flux_kontext, qwen_image_edit, qwen_image_edit_plus): the input "
                             "image's area in pixels for both loops (model.condition_area; default 128*128)")
    parser.add_argument("--only", choices=["trainer", "bare"], help=argparse.SUPPRESS)  # a --flux-full-width child
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per loop (alternating)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="the trainer's data-loader workers (its default 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both denoisers (train.compile=true)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: a table of "
                                                          "H100 / H200 / A100 / 4090)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    args = parser.parse_args()
    if args.flux_full_width and args.family != "flux":
        parser.error("--flux-full-width: only with --family flux")
    if args.max_sequence_length is None and args.family in FLOW_FAMILIES:
        args.max_sequence_length = default_sequence_length(args.family)
    quiet_libraries()
    torch.manual_seed(0)
    if args.only:
        return run_one_loop(args)
    if args.flux_full_width:
        return run_full_width(args)
    if args.caches and args.family == "sd":
        parser.error("--caches: tools/bench_cache.py measures the SD caches")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = args.model
        elif args.family in FLOW_FAMILIES:
            model_dir = str(tiny_variant_family(args.family).make_tiny(tmp / f"tiny_{args.family}", seed=0,
                                                                       variant=args.family))
        else:
            model_dir = str(make_tiny_model(tmp / "tiny", seed=0))
        if args.sd15_unet:
            model_dir = str(make_sd15_shaped_model(tmp / "sd15_unet", Path(model_dir)))
        data_dir, data_overrides = bench_data(tmp / "data", args)
        trainer = build_trainer(model_dir, data_overrides, tmp, args)
        trainer.train()  # warm-up steps
        device = trainer.accelerator.device
        sd_batch = None
        if args.family == "sd":  # the bare SD loop trains on the trainer's first batch
            sd_batch = batch_on_device(received(next(iter(trainer.streams[0].loader))), device)
        bare = bare_loop(model_dir, data_dir, device, trainer.weight_dtype, args, sd_batch)
        if args.family in FLOW_FAMILIES:  # the same layers, or the comparison means nothing
            ours = {layer for group in trainer.trained["transformer"].lora_groups for layer in group.layers}
            if ours != bare.adapted_layers():
                sys.exit(f"the loops adapt different layers: {sorted(ours ^ bare.adapted_layers())[:5]}")
        for _ in range(args.warmup):
            bare.step()

        bare_times, peak = [], {}
        cpu = {"trainer": 0.0, "bare": 0.0}  # this process's CPU seconds: on a CPU, what other load does not inflate

        def bare_block() -> None:  # after each trainer block, under the same machine load
            if torch.cuda.is_available():
                peak["trainer"] = max(peak.get("trainer", 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            start = time.process_time()
            bare_times.append(time_bare_block(bare, args.steps))
            cpu["bare"] += time.process_time() - start
            if torch.cuda.is_available():
                peak["bare"] = max(peak.get("bare", 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer_times, cpu["trainer"] = time_trainer_blocks(trainer, args.steps, args.blocks, between=bare_block)

        step_flops = count_step_flops(bare)
        syncs = count_trainer_syncs(trainer, args.steps) if device.type == "cuda" else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report(args, trainer_times, bare_times, cpu, peak, step_flops, syncs, device, device_name)


def report(args, trainer_times: list[float], bare_times: list[float], cpu: dict, peak: dict, step_flops: int,
           syncs: int | None, device: torch.device, device_name: str) -> None:
    """Print both loops' ms/step, their ratios and CPU times, the step's FLOPs and, on a GPU, MFU and syncs."""
    t_trainer, t_bare = statistics.median(trainer_times), statistics.median(bare_times)
    model = "sd15-unet" if args.sd15_unet else (args.model or f"tiny {args.family}")
    print(f"device {device} ({device_name})  model {model}  {args.size}px  batch {args.batch}  "
          f"precision {args.mixed_precision or 'fp32'}  trainer caches {'on' if args.caches else 'off'}  "
          f"compile {'on' if args.compile else 'off'}  workers {args.workers}  {args.blocks} blocks x {args.steps} steps")
    for name, t in (("hcpdiff trainer", t_trainer), ("bare diffusers+peft", t_bare)):
        line = f"{name:20s} {t * 1000:8.1f} ms/step  {1 / t:6.2f} it/s  {args.batch / t:7.2f} images/s"
        if name.startswith("hcp") and "trainer" in peak:
            line += f"  peak GPU {peak['trainer'] / 2**30:.2f} GiB"
        if name.startswith("bare") and "bare" in peak:
            line += f"  peak GPU {peak['bare'] / 2**30:.2f} GiB"
        print(line)
    # each trainer block runs right before its bare block, so their ratio sees nearly the same machine load
    paired = statistics.median(t / b for t, b in zip(trainer_times, bare_times))
    # the fastest block of each: what a step costs when nothing else on the machine got in its way
    fastest = min(trainer_times) / min(bare_times)
    print(f"ratio trainer / bare: {t_trainer / t_bare:.3f}, median of paired blocks {paired:.3f}, fastest blocks "
          f"{fastest:.3f}  (blocks: trainer {[round(t * 1000, 1) for t in trainer_times]}, "
          f"bare {[round(t * 1000, 1) for t in bare_times]} ms)")
    steps = args.blocks * args.steps
    print(f"process CPU time: trainer {cpu['trainer'] / steps * 1000:.1f}, bare {cpu['bare'] / steps * 1000:.1f} "
          f"ms/step, ratio {cpu['trainer'] / cpu['bare']:.3f}")
    peak_tflops = args.peak_tflops or (bf16_peak_tflops(device_name) if device.type == "cuda" else None)
    line = f"model FLOPs per step {step_flops / 1e9:.2f} GFLOP (bare step: VAE + text encode, denoiser fwd + bwd)"
    if peak_tflops:
        mfu = {loop: step_flops / t / (peak_tflops * 1e12) for loop, t in (("trainer", t_trainer), ("bare", t_bare))}
        line += (f"; MFU vs {peak_tflops:g} TFLOP/s bf16 peak: trainer {mfu['trainer']:.1%}, bare {mfu['bare']:.1%}")
    print(line)
    if syncs is not None:
        print(f"host syncs in {args.steps} trainer steps, the last one logging (1 sync): {syncs} "
              "(torch.cuda.set_sync_debug_mode)")


def bf16_peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak from BF16_PEAK_TFLOPS, or None for a GPU not in the table."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def count_step_flops(bare) -> int:
    """FLOPs of one bare-loop step (matmuls, convolutions, attention; forward and backward) by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:  # a compiled denoiser's graphs would hide the operators
        bare.step()
    return counter.get_total_flops()


def count_trainer_syncs(trainer: Trainer, steps: int) -> int:
    """Host syncs (stream synchronisations, blocking copies, `.item()`) CUDA reports in `steps` more trainer steps; the
    last one ends the run and logs (one `.item()`), none saves (BenchTrainer)."""
    trainer.train_steps = trainer.global_step + steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


if __name__ == "__main__":
    main()
