"""End-to-end: prior preservation with the shipped dreambooth.yaml on the tiny SD model, as a user runs it: the class
images are rendered once, reused, topped up identically, and trained beside the instance images with loss_weight."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


def dreambooth_args(tiny_model: Path, instance: Path, *extra: str) -> list[str]:
    """The shipped config, with the tiny model, the folders and CPU-sized settings from the command line."""
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/dreambooth.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={instance}", "data.reg.source.class_images.img_root=class",
            "data.reg.generate.num=3", "data.reg.generate.steps=2", "data.reg.generate.width=64",
            "data.reg.generate.height=64", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
            'data.reg.bucket.target_area=${hcp.eval:"64*64"}', "train.train_steps=1", "train.log_step=1",
            "train.workers=0", *extra]


def first_loss(exp: Path) -> float:
    """The loss train.log reports at step 1."""
    return float(re.search(r"step 1/1 loss ([0-9.]+)", (exp / "train.log").read_text()).group(1))


def test_class_images_render_once_reuse_top_up_and_train_with_their_weight(workdir, tiny_model, cli_in_process):
    instance = make_demo_data(workdir / "instance", num=2)
    folder = workdir / "class"

    def train(name: str, loss_weight: float):
        result = cli_in_process(dreambooth_args(tiny_model, instance, f"exp_dir=exps/{name}",
                                                f"data.reg.loss_weight={loss_weight}"), cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr, first_loss(workdir / "exps" / name)

    # first run: the folder does not exist; 3 images rendered, each with the class prompt as its caption
    log, loss_1 = train("first", 1.0)
    assert "data.reg.generate: 0 of 3 class images in class; rendering 3" in log
    images = sorted(p.name for p in folder.glob("*.png"))
    assert images == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*images, "00000.txt", "00001.txt", "00002.txt"])
    assert {(folder / "00001.txt").read_text().strip()} == {"a photo of a dog"}
    assert "data.reg: 3 images, 3 items" in log
    rendered = {name: np.asarray(Image.open(folder / name)) for name in images}
    assert Image.open(folder / "00000.png").size == (64, 64) and rendered["00000.png"].std() > 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # second run: counted and reused, nothing written; without the class loss, the loss is the instance loss alone
    log, loss_0 = train("reused", 0.0)
    assert "data.reg.generate: 3 class images in class, none to render (reused)" in log and "rendering" not in log
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    # a short folder (1 of 3; one image left its caption behind) is topped up with the same images as before
    (folder / "00001.png").unlink()
    (folder / "00002.png").unlink()
    (folder / "00002.txt").unlink()
    log, loss_2 = train("topped_up", 2.0)
    assert "data.reg.generate: 1 of 3 class images in class; rendering 2" in log
    assert (folder / "00000.png").stat().st_mtime_ns == mtimes["00000.png"]
    for name in ("00001.png", "00002.png"):
        assert np.array_equal(np.asarray(Image.open(folder / name)), rendered[name]), name
    assert (folder / "00002.txt").read_text().strip() == "a photo of a dog"

    # the summed loss: instance + loss_weight x class; the instance and class batches are the same in every run
    class_loss = loss_1 - loss_0
    assert class_loss > 0.01
    assert loss_2 == pytest.approx(loss_0 + 2 * class_loss, abs=1e-4)


def test_bad_generate_keys_stop_before_the_model_loads(workdir, cli_in_process, one_error_line):
    """A typo'd key, a zero count, or two sources for one generated folder: one line naming the key."""
    args = dreambooth_args(workdir / "no_model", workdir / "instance", "+data.reg.generate.stesp=4",
                           "data.reg.generate.num=0")
    line = one_error_line(cli_in_process(args, cwd=workdir))
    assert "`data.reg.generate.stesp`: unknown key (did you mean 'steps'?)" in line
    assert "`data.reg.generate.num`:" in line
    args = dreambooth_args(workdir / "no_model", workdir / "instance", "+data.reg.source.more.img_root=more")
    line = one_error_line(cli_in_process(args, cwd=workdir))
    assert "data.reg.generate: renders into one folder; give data.reg.source exactly one source" in line
    assert not (workdir / "class").exists() and not (workdir / "exps").exists()
