"""Steps/s of hcpdiff's trainer with the latent + text-embedding caches against without them.

Two trainers on the same model, data, batch and LoRA (rank 8 on to_q, to_k, to_v, to_out.0) run in this process:
"cached" has cache_latents: true (in memory) and cache_text_embeds: auto (on: one fixed prompt per image), "uncached"
decodes, VAE-encodes and text-encodes every step. Blocks of steps alternate between the two so drift in machine
load hits both alike; the median block is reported. Each model is measured in the same run:

    python tools/bench_cache.py --threads 1           # tiny model and a mid-size U-Net (128/256/512), 256 px, batch 2
    python tools/bench_cache.py --model PATH --size 512 --batch 4 --mixed_precision bf16   # a real model on a GPU
"""
from __future__ import annotations

import argparse
import shutil
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


def make_mid_model(out_dir: Path, tiny_dir: Path) -> Path:
    """The tiny pipeline with a mid-size U-Net (block_out_channels 128/256/512, random weights)."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_dir, out_dir)
    text_width = load_model_parts(str(tiny_dir)).text_encoder.config.hidden_size
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(128, 256, 512), layers_per_block=1, cross_attention_dim=text_width,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )
    shutil.rmtree(out_dir / "unet")
    unet.save_pretrained(out_dir / "unet")
    return out_dir


def build_trainer(model_dir: str, data_dir: Path, exp_dir: Path, cached: bool, args) -> Trainer:
    """demo_tiny.yaml pointed at the model and data, with both caches on or both off."""
    overrides = [
        f"model.pretrained_model_name_or_path={model_dir}",
        f"data.dataset1.source.data_source1.img_root={data_dir}",
        f"data.dataset1.source.data_source1.caption_file={data_dir}",
        "data.dataset1.source.data_source1.prompt_template=null",
        f"data.dataset1.batch_size={args.batch}",
        f"data.dataset1.bucket={{_target_: hcpdiff.data.FixedBucket, _partial_: true, target_size: {args.size}}}",
        f"data.dataset1.cache_latents={str(cached).lower()}",
        f"data.dataset1.cache_text_embeds={'auto' if cached else 'false'}",
        "lora_unet=[{lr: 1e-4, rank: 8, alpha: 8, layers: ['re:.*\\.(to_q|to_k|to_v|to_out\\.0)$']}]",
        f"train.train_steps={args.warmup}", "train.save_step=1000000", "train.log_step=1000000",
        f"train.workers={args.workers}", f"exp_dir={exp_dir}", f"mixed_precision={args.mixed_precision or 'null'}",
    ]
    cfg = load_config(REPO_ROOT / "cfgs/train/examples/demo_tiny.yaml", overrides)
    trainer = Trainer(cfg, single_process=True)
    trainer.setup()
    trainer.train()  # warm-up steps
    return trainer


def time_block(trainer: Trainer, batches, steps: int) -> float:
    """Seconds per step for `steps` steps: next batch (decode or cache), compute_loss, backward, optimizer step.

    The trainer's own train() would also write a checkpoint at the end of every block, which caching does not touch.
    """
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.compute_loss(next(batches), 1.0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def compare(name: str, model_dir: str, data_dir: Path, tmp: Path, args) -> None:
    """Time cached against uncached in alternating blocks and print both and their ratio."""
    setup_start = time.perf_counter()
    cached = build_trainer(model_dir, data_dir, tmp / f"{name}-cached", True, args)
    setup_cached = time.perf_counter() - setup_start
    uncached = build_trainer(model_dir, data_dir, tmp / f"{name}-uncached", False, args)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    batches = {"cached": cached.streams[0].batches(), "uncached": uncached.streams[0].batches()}
    for _ in range(args.blocks):
        times["cached"].append(time_block(cached, batches["cached"], args.steps))
        times["uncached"].append(time_block(uncached, batches["uncached"], args.steps))
    median = {key: statistics.median(value) for key, value in times.items()}
    print(f"{name}: device {cached.accelerator.device}  {args.size}px  batch {args.batch}  "
          f"precision {args.mixed_precision or 'fp32'}  threads {torch.get_num_threads()}  "
          f"{args.blocks} blocks x {args.steps} steps  "
          f"(cached trainer set-up incl. encoding: {setup_cached:.1f} s)")
    for key in ("uncached", "cached"):
        t = median[key]
        print(f"  {key:9s} {t * 1000:8.1f} ms/step  {1 / t:6.2f} steps/s   blocks {[round(x * 1000) for x in times[key]]} ms")
    print(f"  speed-up cached / uncached: {median['uncached'] / median['cached']:.2f}x steps/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a diffusers folder to measure instead of the tiny and mid-size models")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0: torch's default. On a shared, loaded CPU use 1: oversubscribed "
                             "threads made steps 20x slower and swamped the difference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir = make_demo_data(tmp / "data", num=args.images)
        if args.model:
            compare(Path(args.model).name, args.model, data_dir, tmp, args)
            return
        tiny = make_tiny_model(tmp / "tiny", seed=0)
        compare("tiny model", str(tiny), data_dir, tmp, args)
        compare("mid U-Net 128/256/512", str(make_mid_model(tmp / "mid", tiny)), data_dir, tmp, args)


if __name__ == "__main__":
    main()
