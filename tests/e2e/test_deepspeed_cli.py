"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate config files, for real, on two CPU processes (DeepSpeed's CPU
accelerator over gloo): the LoRA each trains equals one process's with the same total batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytest.importorskip("deepspeed", reason="pip install deepspeed (tools/install.sh test does)")

REPO = Path(__file__).resolve().parents[2]
# ZeRO-3 with every parameter sharded: DeepSpeed keeps parameters under 1e5 elements (LoRA's, here) whole by
# default, so a threshold of 0 is what makes checkpoint saving gather them.
ZERO3_ALL_SHARDED = """{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}"""
ZERO3_ACCELERATE = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: false
"""


def train(cli, launcher: list[str], workdir: Path, tiny_model: Path, data: Path, batch_size: int = 1) -> Path:
    """4 steps of batch_size x accumulation 2 per process. One bucket: a step's global batch is the same images
    however many processes share it; step 1 warms up at lr 0 (a first Adam step moves weights with near-zero
    gradients by about lr either way, which float summation order decides)."""
    workdir.mkdir()
    (workdir / "cfgs").symlink_to(REPO / "cfgs")
    result = cli([*launcher, "-m", "hcpdiff.train_ac", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                  f"model.pretrained_model_name_or_path={tiny_model}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data}",
                  "train.train_steps=4", "train.save_step=2", "train.gradient_accumulation_steps=2",
                  "train.scheduler.num_warmup_steps=1", "data.dataset1.bucket.num_bucket=1",
                  f"data.dataset1.batch_size={batch_size}", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}'],
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (exp,) = (workdir / "exps").iterdir()
    return exp


def test_zero2_and_zero3_train_the_same_lora_as_one_process(tmp_path, tiny_model, cli, cli_in_process, free_port):
    data = make_demo_data(tmp_path / "data", num=4)  # every step takes all four images
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no"]
    (tmp_path / "zero3.json").write_text(ZERO3_ALL_SHARDED)
    (tmp_path / "zero3.yaml").write_text(ZERO3_ACCELERATE.format(json=tmp_path / "zero3.json"))
    # the reference: one process, twice the batch, the same entry point in this test's process
    one = train(cli_in_process, [], tmp_path / "one", tiny_model, data, batch_size=2)
    runs = {
        "zero2": train(cli, [*accelerate, "--config_file", str(REPO / "cfgs/accelerate/deepspeed_zero2.yaml"),
                             "--main_process_port", str(free_port())], tmp_path / "zero2", tiny_model, data),
        "zero3": train(cli, [*accelerate, "--config_file", str(tmp_path / "zero3.yaml"),
                             "--main_process_port", str(free_port())],
                       tmp_path / "zero3", tiny_model, data),
    }
    reference = load_file(one / "ckpts" / "unet-4.safetensors")
    start = load_file(one / "ckpts" / "unet-2.safetensors")
    assert any(not torch.equal(reference[key], start[key]) for key in reference)  # steps 3-4 trained
    assert (one / "state").is_dir()
    for name, exp in runs.items():
        log = (exp / "train.log").read_text()
        assert "DEEPSPEED: checkpoints are written, resumable state files are not" in log, name
        assert "total batch size 4 (batch 1 x accumulation 2 x processes 2)" in log, name
        assert sorted(p.name for p in (exp / "ckpts").iterdir()) == ["unet-2.safetensors", "unet-4.safetensors"], name
        assert not (exp / "state").exists(), name
        trained = load_file(exp / "ckpts" / "unet-4.safetensors")
        assert trained.keys() == reference.keys(), name
        for key in reference:
            assert trained[key].shape == reference[key].shape, (name, key)  # ZeRO-3: gathered, not empty shards
            assert torch.allclose(trained[key], reference[key], atol=1e-6), (name, key)
    # the ZeRO-2 file says gradient_accumulation_steps 1; the hcpdiff config's 2 wins, with one warning line
    assert (runs["zero2"] / "train.log").read_text().count("gradient_accumulation_steps 1 -> 2") == 1
    one_params = (one / "train.log").read_text().split("trainable parameters")[0].rsplit(",", 1)[1]
    assert one_params in (runs["zero3"] / "train.log").read_text()  # sharded parameters are counted whole
