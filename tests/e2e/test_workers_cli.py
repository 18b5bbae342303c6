"""Loader workers (`train.workers`, 2 by default) train exactly what loading in the training process trains: every
sample's flip, crop, template and noise are drawn from its own seeds whichever process decodes it, the batches come
back inline from the workers, and one loader iteration runs the whole run, epoch after epoch. Resuming mid-epoch with
workers replays the same steps."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e
CKPT = "ckpts/unet-7.safetensors"


def train_args(tiny_model: Path, data: Path, workers: int, *extra: str) -> list[str]:
    """demo_tiny.yaml on 5 images in 3 buckets, batch 2 (3 batches an epoch): 7 steps run into a third epoch."""
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            "data.dataset1.source.data_source1.random_flip=true", "data.dataset1.source.data_source1.crop=random",
            'data.dataset1.bucket.target_area=${hcp.eval:"48*48"}', "data.dataset1.cache_latents=false",
            "train.train_steps=7", "train.save_step=1", "train.log_step=1", "train.scheduler.num_warmup_steps=2",
            f"train.workers={workers}", "mixed_precision=null", *extra]


def differing(first: Path, second: Path) -> list[str]:
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and a
    return [key for key in a if not a[key].equal(b[key])]


def test_workers_train_what_the_training_process_trains_and_resume_exactly(workdir, tiny_model, cli, cli_in_process):
    data = make_demo_data(workdir / "data", num=5)
    inline = cli_in_process(train_args(tiny_model, data, 0, "exp_dir=exps/inline"), cwd=workdir)
    assert inline.returncode == 0, inline.stderr[-3000:]
    # a process of its own: the loader's workers fork from the training process, as in a user's run
    workers = cli(train_args(tiny_model, data, 2, "exp_dir=exps/workers"), cwd=workdir)
    assert workers.returncode == 0, workers.stderr[-3000:]
    different = differing(workdir / "exps/inline" / CKPT, workdir / "exps/workers" / CKPT)
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    losses = re.findall(r"step (\d)/7 loss ([\d.]+)", (workdir / "exps/workers/train.log").read_text())
    assert losses == re.findall(r"step (\d)/7 loss ([\d.]+)", (workdir / "exps/inline/train.log").read_text())
    assert len(losses) == 7

    # cut after step 4 (the second batch of the second epoch) and resume, with workers again
    shutil.copytree(workdir / "exps/workers", workdir / "exps/cut")
    for step in (5, 6, 7):
        (workdir / f"exps/cut/ckpts/unet-{step}.safetensors").unlink()
        (workdir / f"exps/cut/state/step-{step}.pt").unlink()
    resumed = cli(train_args(tiny_model, data, 2, "train.resume=exps/cut"), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed \S*exps/cut at step 4\b", resumed.stderr), resumed.stderr[-3000:]
    different = differing(workdir / "exps/workers" / CKPT, workdir / "exps/cut" / CKPT)
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[0]}"
