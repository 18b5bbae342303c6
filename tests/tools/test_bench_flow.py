"""The flow-matching bare loops of tools/bench_train_step.py (tools/bench_flow.py) still run on each family's tiny
model and adapt exactly the layers hcpdiff selects from the shipped config, so the benchmark compares like with like.
In process: the script's own smoke run (tests/tools/test_benchmarks_run.py, FLUX) covers its trainer side."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hcpdiff.families import family_named, tiny_variant_family
from hcpdiff.lora.layer_select import select_layers
from hcpdiff.tools.make_demo_data import family_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_flow import BARE_LOOPS, demo_batch, shipped_lora_group  # noqa: E402


@pytest.mark.parametrize("family", ["sd3", "qwen_image", "z_image", "krea2", "flux2_dev", "flux2_klein",
                                    "flux_kontext", "qwen_image_edit", "qwen_image_edit_plus"])
def test_bare_loop_steps_on_the_shipped_layers(tmp_path, family):
    model = tiny_variant_family(family).make_tiny(tmp_path / family, seed=0, variant=family)
    data, _ = family_dataset(tiny_variant_family(family), tmp_path / "data", num=2)  # editing: input images too
    batch = demo_batch(data, 32, 2)
    loop = BARE_LOOPS[family](str(model), batch, torch.device("cpu"), torch.float32, max_sequence_length=64,
                              condition_area=32 * 32)
    before = [param.detach().clone() for param in loop.params]
    loop.step()
    assert any(not torch.equal(old, new) for old, new in zip(before, loop.params))
    # peft's layers are hcpdiff's selection, made on an unadapted transformer as the trainer makes it
    load = family_named(family).part_loaders(str(model), {"revision": None, "local_files_only": True})["transformer"]
    transformer = load()
    unused = family_named(family).unused_layers("transformer", transformer)
    selected = set(select_layers(transformer, shipped_lora_group(family)["layers"], "layers")) - unused
    assert loop.adapted_layers() == selected


@pytest.mark.parametrize("family", ["flux_kontext", "qwen_image_edit", "qwen_image_edit_plus"])
def test_editing_bare_loop_encodes_what_the_trainer_encodes(tmp_path, family):
    """The same input images at the same area: the bare loop's input-image tokens and prompt states are those of
    hcpdiff's conditioner on the trainer's batch (condition_pixels) at model.condition_area."""
    from hcpdiff.data.images import to_tensor
    from hcpdiff.models import load_model_parts

    model = tiny_variant_family(family).make_tiny(tmp_path / family, seed=0, variant=family)
    data, _ = family_dataset(tiny_variant_family(family), tmp_path / "data", num=2)
    batch = demo_batch(data, 64, 2)
    loop = BARE_LOOPS[family](str(model), batch, torch.device("cpu"), torch.float32, max_sequence_length=64,
                              condition_area=32 * 32)
    with torch.no_grad():
        bare = loop.encode_text()
    parts = load_model_parts(str(model))
    conditioner = parts.family.build_conditioner(parts.components, 1, 0, max_sequence_length=64,
                                                 condition_area=32 * 32)
    pixels = torch.stack([torch.stack([to_tensor(image) for image in images]) for images in batch["condition_images"]])
    with torch.no_grad():
        ours = conditioner(batch["prompts"], {"condition_pixels": pixels}, torch.device("cpu"))
    for key in ("condition_latents", "encoder_hidden_states"):
        torch.testing.assert_close(bare[key].float(), ours[key].float(), rtol=1e-4, atol=1e-4)


def test_bench_report_gives_mfu_peak_memory_and_syncs_on_a_gpu(capsys):
    """The GPU figures are taken on a lent GPU, once: the report's GPU lines are checked here on made-up timings."""
    import argparse

    from bench_train_step import report

    args = argparse.Namespace(sd15_unet=True, model=None, family="sd", size=512, batch=8, mixed_precision="bf16",
                              caches=False, compile=False, workers=2, blocks=2, steps=10, peak_tflops=None)
    report(args, [0.200, 0.210], [0.190, 0.200], {"trainer": 4.1, "bare": 3.9}, {"trainer": 2**31, "bare": 2**30},
           int(98.94e12), 1, torch.device("cuda"), "NVIDIA H100 80GB HBM3")
    out = capsys.readouterr().out
    # 98.94 TFLOP a step in medians of 0.205 and 0.195 s against H100 SXM's 989.4 TFLOP/s
    assert "MFU vs 989.4 TFLOP/s bf16 peak: trainer 48.8%, bare 51.3%" in out
    assert "peak GPU 2.00 GiB" in out and "peak GPU 1.00 GiB" in out
    assert "host syncs in 10 trainer steps, the last one logging (1 sync): 1" in out
    assert "ratio trainer / bare: 1.051" in out


@pytest.mark.parametrize("steps", [1, 3])
def test_trainer_blocks_are_whole_stretches_of_one_run(steps):
    """`blocks` blocks of `steps` steps, each followed by one bare block, inside one run whose first and last steps
    are untimed (the loop's start, the end-of-run log)."""
    import types

    from bench_train_step import time_trainer_blocks

    events = []

    class FakeTrainer:
        accelerator = types.SimpleNamespace(device=torch.device("cpu"))
        global_step, after_step = 10, None

        def train(self):
            events.append("run")
            while self.global_step < self.train_steps:
                self.global_step += 1
                events.append("step")
                self.after_step()

    times, _ = time_trainer_blocks(FakeTrainer(), steps, 2, between=lambda: events.append("bare"))
    assert len(times) == 2
    assert events == ["run", "step", *(["step"] * steps + ["bare"]) * 2, "step"]
