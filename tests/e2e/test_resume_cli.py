"""Resume: SIGTERM saves a resumable state, a corrupt checkpoint is named, ckpt_keep keeps the newest. That a resumed
run ends exactly where an uninterrupted one does is tested for every family in tests/families/test_family_resume.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


@pytest.fixture
def demo_args(workdir, tiny_model):
    """demo_tiny.yaml on the tiny model and three images, deterministic prompts, small images."""
    data = make_demo_data(workdir / "data", num=3)
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "train.scheduler.num_warmup_steps=2"]


def test_sigterm_saves_a_resumable_checkpoint(workdir, demo_args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, *demo_args, "train.train_steps=500", "train.save_step=1000",
                             "train.log_step=1", "exp_dir=exps/sig"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = workdir / "exps/sig/train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step 2/500" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "train.resume=exps/sig" in stderr
    states = sorted((workdir / "exps/sig/state").glob("step-*.pt"))
    assert len(states) == 1
    step = int(states[0].stem.split("-")[1])
    assert (workdir / f"exps/sig/ckpts/unet-{step}.safetensors").exists()


def test_corrupt_checkpoint_is_named_not_loaded(workdir, demo_args, cli_in_process):
    assert cli_in_process([*demo_args, "train.train_steps=2", "exp_dir=exps/run"], cwd=workdir).returncode == 0
    ckpt = workdir / "exps/run/ckpts/unet-2.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])  # a partial write
    result = cli_in_process([*demo_args, "train.train_steps=4", "train.resume=exps/run"], cwd=workdir)
    assert result.returncode == 2
    assert "unet-2.safetensors" in result.stderr.strip().splitlines()[-1]


def test_ckpt_keep_keeps_the_newest(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "train.train_steps=4", "train.save_step=1", "train.ckpt_keep=2",
                             "exp_dir=exps/k"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "exps/k/ckpts").iterdir()) == ["unet-3.safetensors", "unet-4.safetensors"]
    assert sorted(p.name for p in (workdir / "exps/k/state").iterdir()) == ["step-3.pt", "step-4.pt"]
