"""Steady-state ms per optimizer step: hcpdiff's trainer against a bare diffusers + peft loop.

Both run in this process on the same model, batch size, image size and LoRA layers (rank 8 on to_q, to_k,
to_v, to_out.0), each step encoding images with the VAE and prompts with the text encoder. Blocks of steps
alternate between the two so drift in machine load hits both alike; the median block is reported.

    python tools/bench_train_step.py                              # tiny model, 256 px, batch 2, CPU
    python tools/bench_train_step.py --model PATH --size 512 --batch 8 --mixed_precision bf16   # on a GPU
    python tools/bench_train_step.py --sd15-unet --size 512 --batch 1 --mixed_precision bf16     # SD1.5-shaped U-Net, random weights
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hcpdiff.config import load_config  # noqa: E402
from hcpdiff.models import load_model_parts  # noqa: E402
from hcpdiff.tools.make_demo_data import make_demo_data  # noqa: E402
from hcpdiff.tools.make_tiny_model import make_tiny_model  # noqa: E402
from hcpdiff.train.run import quiet_libraries  # noqa: E402
from hcpdiff.train.trainer import Trainer  # noqa: E402

LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]


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


def build_trainer(model_dir: str, data_dir: Path, exp_root: Path, args) -> Trainer:
    """hcpdiff's trainer from demo_tiny.yaml, pointed at the same model, data, batch and layers."""
    overrides = [
        f"model.pretrained_model_name_or_path={model_dir}",
        f"data.dataset1.source.data_source1.img_root={data_dir}",
        f"data.dataset1.source.data_source1.caption_file={data_dir}",
        "data.dataset1.source.data_source1.prompt_template=null",
        # both loops encode every step; tools/bench_cache.py measures what the caches save
        "data.dataset1.cache_latents=false", "data.dataset1.cache_text_embeds=false",
        f"data.dataset1.batch_size={args.batch}",
        f"data.dataset1.bucket={{_target_: hcpdiff.data.FixedBucket, _partial_: true, target_size: {args.size}}}",
        "lora_unet=[{lr: 1e-4, rank: 8, alpha: 8, layers: ['re:.*\\.(to_q|to_k|to_v|to_out\\.0)$']}]",
        f"train.train_steps={args.warmup}", "train.save_step=1000000", "train.log_step=1000000",
        f"train.workers={args.workers}", f"exp_dir={exp_root / 'trainer'}",
        f"mixed_precision={args.mixed_precision or 'null'}",
    ]
    cfg = load_config(REPO_ROOT / "cfgs/train/examples/demo_tiny.yaml", overrides)
    trainer = Trainer(cfg, single_process=True)
    trainer.setup()
    return trainer


def time_trainer_block(trainer: Trainer, steps: int) -> float:
    """Seconds per step for `steps` more optimizer steps of the trainer's own loop."""
    trainer.train_steps = trainer.global_step + steps
    sync(trainer.accelerator.device)
    start = time.perf_counter()
    trainer.train()
    sync(trainer.accelerator.device)
    return (time.perf_counter() - start) / steps


def time_bare_block(bare: BareLoop, steps: int) -> float:
    """Seconds per step for `steps` steps of the bare loop."""
    sync(bare.device)
    start = time.perf_counter()
    for _ in range(steps):
        bare.step()
    sync(bare.device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder (default: a tiny random model made here)")
    parser.add_argument("--sd15-unet", action="store_true", help="swap in a random SD1.5-architecture U-Net")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per loop (alternating)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model or str(make_tiny_model(tmp / "tiny", seed=0))
        if args.sd15_unet:
            model_dir = str(make_sd15_shaped_model(tmp / "sd15_unet", Path(model_dir)))
        data_dir = make_demo_data(tmp / "data", num=max(4, args.batch * 2))
        trainer = build_trainer(model_dir, data_dir, tmp, args)
        trainer.train()  # warm-up steps
        batch = next(iter(trainer.streams[0].loader))
        bare = BareLoop(model_dir, batch, trainer.accelerator.device, trainer.weight_dtype)
        for _ in range(args.warmup):
            bare.step()

        trainer_times, bare_times = [], []
        peak = {}
        for _ in range(args.blocks):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer_times.append(time_trainer_block(trainer, args.steps))
            if torch.cuda.is_available():
                peak["trainer"] = max(peak.get("trainer", 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            bare_times.append(time_bare_block(bare, args.steps))
            if torch.cuda.is_available():
                peak["bare"] = max(peak.get("bare", 0), torch.cuda.max_memory_allocated())

    t_trainer, t_bare = statistics.median(trainer_times), statistics.median(bare_times)
    device = trainer.accelerator.device
    print(f"device {device}  model {'sd15-unet' if args.sd15_unet else (args.model or 'tiny')}  "
          f"{args.size}px  batch {args.batch}  precision {args.mixed_precision or 'fp32'}  "
          f"{args.blocks} blocks x {args.steps} steps")
    for name, t in (("hcpdiff trainer", t_trainer), ("bare diffusers+peft", t_bare)):
        line = f"{name:20s} {t * 1000:8.1f} ms/step  {1 / t:6.2f} it/s  {args.batch / t:7.2f} images/s"
        if name.startswith("hcp") and "trainer" in peak:
            line += f"  peak GPU {peak['trainer'] / 2**30:.2f} GiB"
        if name.startswith("bare") and "bare" in peak:
            line += f"  peak GPU {peak['bare'] / 2**30:.2f} GiB"
        print(line)
    print(f"ratio trainer / bare: {t_trainer / t_bare:.3f}  "
          f"(blocks: trainer {[round(t * 1000) for t in trainer_times]}, bare {[round(t * 1000) for t in bare_times]} ms)")


if __name__ == "__main__":
    main()
