"""Memory and speed of hcpdiff's memory settings on a full-width FLUX, each setting in its own process.

A FLUX.1 transformer at full width (3072 = 24 heads x 128, T5 width 4096) with reduced depth (default 2 double + 2
single blocks; `--double 19 --single 38` is FLUX.1-dev's own depth, for a GPU), random weights, trained through the
shipped cfgs/train/examples/lora_flux.yaml (rank 16 on the attention and MLP projections), batch 1, caches off, for
every setting asked: the base stored in bf16 or quantized (`model.quantize`: int8, fp8, nf4), gradient checkpointing
off / on / offload, block swap, and the 8-bit AdamW of lora_flux_adamw8bit.yaml. The bare diffusers + peft loop
(tools/bench_flow.py) runs in the same invocation and precision. Each line gives the median s/step, the resident memory
after set-up, the peak resident memory *during the timed steps* (Linux's high-water mark is reset after set-up, so
the one-off peak of loading and casting the fp32 file does not hide the training peak), the peak GPU memory on a
GPU, and the optimizer state's size.

    python tools/bench_memory.py                                  # 2+2 blocks, 512 px, every setting (a GPU)
    python tools/bench_memory.py --double 19 --single 38 --size 1024   # on a GPU: FLUX.1-dev's architecture
    python tools/bench_memory.py --optimizer-state                # AdamW state of a rank-16 LoRA on FLUX.1-dev
    python tools/bench_memory.py --double 1 --single 1 --size 128 --max_sequence_length 64 --mixed_precision no
        # a CPU smoke run: bf16 matmuls run on a slow path on CPUs without bf16 units (a 1+1-block step took
        # minutes here), so CPU figures use fp32 compute at small sizes

Settings are `base[+option...]`: base `bf16 | int8 | fp8 | nf4`, options `ckpt` (gradient_checkpointing true),
`offload` (gradient_checkpointing offload), `swapN` (blocks_to_swap N), `adam8` (bitsandbytes AdamW8bit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

DEFAULT_SETTINGS = ["bf16", "bf16+ckpt", "bf16+offload", "int8", "int8+ckpt", "int8+offload", "fp8", "fp8+ckpt",
                    "fp8+offload", "nf4", "nf4+ckpt", "bf16+swap2", "bf16+adam8"]
MIB = 2 ** 20


def setting_overrides(setting: str) -> list[str]:
    """The config overrides of one `base[+option...]` setting."""
    base, *options = setting.split("+")
    if base not in ("bf16", "int8", "fp8", "nf4"):
        raise SystemExit(f"setting {setting!r}: the base must be bf16, int8, fp8 or nf4")
    overrides = [] if base == "bf16" else [f"model.quantize={{transformer: {base}}}"]
    for option in options:
        if option == "ckpt":
            overrides.append("model.gradient_checkpointing=true")
        elif option == "offload":
            overrides.append("model.gradient_checkpointing=offload")
        elif option.startswith("swap") and option[4:].isdigit():
            overrides.append(f"model.blocks_to_swap={option[4:]}")
        elif option == "adam8":
            # merged into train_base's AdamW mapping: its betas and weight_decay are AdamW8bit's arguments too
            overrides += ["train.optimizer={_target_: bitsandbytes.optim.AdamW8bit, _partial_: true}"]
        else:
            raise SystemExit(f"setting {setting!r}: unknown option {option!r} (ckpt, offload, swapN, adam8)")
    return overrides


def reset_peak_rss() -> None:
    """Start Linux's resident high-water mark (VmHWM) again from the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def optimizer_state_mib(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of every tensor in the optimizer's state (bitsandbytes nests its 8-bit moments one level down)."""
    def tensors(node):
        if isinstance(node, torch.Tensor):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from tensors(value)
    total = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in tensors(state))
    return total / MIB


def run_child(args) -> None:
    """`--child SETTING`: train that setting in this process and print one RESULT line."""
    from bench_flow import BARE_LOOPS, demo_batch, shipped_config
    from bench_train_step import BenchTrainer, time_bare_block, time_trainer_blocks

    from hcpdiff.config import load_config
    from hcpdiff.tools.make_demo_data import make_demo_data
    from hcpdiff.train.run import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = make_demo_data(tmp / "data", num=4)
        if args.child == "bare":
            dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
            loop = BARE_LOOPS["flux"](args.model, demo_batch(data_dir, args.size, 1), device, dtype,
                                      max_sequence_length=args.max_sequence_length)
            step = loop.step
            time_blocks = lambda: [time_bare_block(loop, args.steps) for _ in range(args.blocks)]  # noqa: E731
            optimizer = loop.optimizer
        else:
            overrides = [
                f"model.pretrained_model_name_or_path={args.model}",
                f"data.dataset1.source.data_source1.img_root={data_dir}",
                f"data.dataset1.source.data_source1.caption_file={data_dir}",
                "data.dataset1.source.data_source1.prompt_template=null",
                "data.dataset1.cache_latents=false", "data.dataset1.cache_text_embeds=false",
                "data.dataset1.batch_size=1",
                f"data.dataset1.bucket={{_target_: hcpdiff.data.FixedBucket, _partial_: true, target_size: {args.size}}}",
                "train.train_steps=1", "train.save_step=1000000", "train.log_step=1000000", "train.workers=0",
                f"exp_dir={tmp / 'exp'}", f"mixed_precision={'bf16' if args.mixed_precision == 'bf16' else 'null'}", "transformer_lr=1e-4",
                "train.scheduler.num_warmup_steps=0", f"model.max_sequence_length={args.max_sequence_length}",
                *setting_overrides(args.child)]
            trainer = BenchTrainer(load_config(shipped_config("flux"), overrides), single_process=True)
            trainer.setup()
            step = trainer.train
            time_blocks = lambda: time_trainer_blocks(trainer, args.steps, args.blocks)[0]  # noqa: E731
            optimizer = trainer.optimizer
        after_setup = rss_mib("VmRSS")
        step()  # one warm-up step (the trainer's train_steps=1 run) builds the optimizer state
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = time_blocks()
        result = {"setting": args.child, "s_per_step": statistics.median(times), "rss_after_setup_mib": after_setup,
                  "peak_rss_steps_mib": rss_mib("VmHWM"), "optimizer_state_mib": optimizer_state_mib(optimizer),
                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None}
    print("RESULT " + json.dumps(result), flush=True)


def flux_dev_lora_weights(rank: int = 16) -> int:
    """Trainable weights of the shipped lora_flux.yaml group at `rank` on FLUX.1-dev's architecture (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from hcpdiff.lora.layer_select import select_layers

    with init_empty_weights():
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1-dev's
    from bench_flow import shipped_lora_group

    layers = select_layers(transformer, shipped_lora_group("flux")["layers"], "lora_transformer")
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[name].in_features + modules[name].out_features) for name in layers)


def print_optimizer_state() -> None:
    weights = flux_dev_lora_weights()
    fp32 = 2 * weights * 4 / MIB  # AdamW: exp_avg and exp_avg_sq in fp32
    eight = 2 * weights * (1 + 4 / 256) / MIB  # AdamW8bit: uint8 moments, an fp32 absmax per 256 values
    print(f"rank-16 LoRA on FLUX.1-dev's shipped layers: {weights / 1e6:.1f} M weights")
    print(f"  AdamW state      {fp32:8.1f} MiB")
    print(f"  AdamW8bit state  {eight:8.1f} MiB  ({eight / fp32:.3f} of AdamW's)")
    for billions in (12, 20):
        print(f"  full fine-tune of a {billions} B transformer: AdamW {2 * billions * 4e9 / 2**30:.1f} GiB, "
              f"AdamW8bit {2 * billions * 1e9 * (1 + 4 / 256) / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=1, help="timed blocks per setting")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--mixed_precision", choices=["bf16", "no"], default="bf16",
                        help="compute dtype of both loops (no: fp32, for CPU smoke runs)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare diffusers + peft loop")
    parser.add_argument("--optimizer-state", action="store_true",
                        help="only print the AdamW / AdamW8bit state sizes of a FLUX.1-dev LoRA (no training)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.optimizer_state:
        return print_optimizer_state()
    for setting in args.settings:
        setting_overrides(setting)  # a bad setting stops here, before the model is built
    from bench_flow import make_full_width_flux

    from hcpdiff.train.run import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = make_full_width_flux(Path(tmp) / "flux", double=args.double, single=args.single)
        print(f"FLUX at full width, {args.double} double + {args.single} single blocks, random weights; built in "
              f"{time.perf_counter() - start:.0f} s. {args.size}px, batch 1, T5 length {args.max_sequence_length}, "
              f"{'bf16' if args.mixed_precision == 'bf16' else 'fp32'} compute, caches off, {args.blocks} block(s) x {args.steps} step(s), one process each", flush=True)
        print(f"{'setting':22s} {'s/step':>8s} {'RSS set-up':>11s} {'peak RSS steps':>15s} {'optim state':>12s}"
              f"{'  peak GPU' if torch.cuda.is_available() else ''}", flush=True)
        results = {}
        for setting in [*args.settings, *([] if args.no_bare else ["bare"])]:
            command = [sys.executable, __file__, "--child", setting, "--model", str(model), "--size", str(args.size),
                       "--steps", str(args.steps), "--blocks", str(args.blocks),
                       "--max_sequence_length", str(args.max_sequence_length), "--mixed_precision", args.mixed_precision]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{setting:22s} failed: {last}", flush=True)
                continue
            result = results[setting] = json.loads(line[len("RESULT "):])
            name = "bare diffusers+peft" if setting == "bare" else setting
            gpu = f"  {result['peak_gpu_mib']:8.0f} MiB" if result["peak_gpu_mib"] is not None else ""
            print(f"{name:22s} {result['s_per_step']:8.2f} {result['rss_after_setup_mib']:7.0f} MiB "
                  f"{result['peak_rss_steps_mib']:11.0f} MiB {result['optimizer_state_mib']:8.1f} MiB{gpu}", flush=True)
        if "bare" in results and "bf16" in results:
            ours, bare = results["bf16"], results["bare"]
            print(f"bf16 trainer / bare: {ours['s_per_step'] / bare['s_per_step']:.3f} s/step, "
                  f"{ours['peak_rss_steps_mib'] / bare['peak_rss_steps_mib']:.3f} peak RSS during steps")


if __name__ == "__main__":
    main()
