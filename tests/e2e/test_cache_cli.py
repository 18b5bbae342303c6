"""End-to-end: training from the latent cache on disk, as a user runs it twice, and the random-crop refusal."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


def train_args(tiny_model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            "train.train_steps=2", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', *extra]


def cache_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "latent cache" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_disk_latent_cache_is_filled_once_and_reused(workdir, tiny_model, cli_in_process):
    """cache_latents + cache_dir: the first run encodes every image (both flips), the second encodes none.

    With one fixed prompt per image (no template file), cache_text_embeds: auto caches the prompts too, under
    cache_dir/text_embeds (not counted with the latent entries), and the text encoder is released.
    """
    data = make_demo_data(workdir / "data", num=3)
    args = train_args(tiny_model, data, "data.dataset1.cache_latents=true", "data.dataset1.cache_dir=latent_cache",
                      "data.dataset1.source.data_source1.random_flip=true",
                      "data.dataset1.source.data_source1.prompt_template=null")
    first = cli_in_process(args + ["exp_dir=exps/first"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"latent cache in latent_cache: 6 encoded, 0 reused", cache_line(first.stderr))
    assert len(list((workdir / "latent_cache").glob("*.safetensors"))) == 6
    assert re.search(r"text embeddings cached in latent_cache/text_embeds for (\d+) prompts: \1 encoded, 0 reused",
                     first.stderr)
    second = cli_in_process(args + ["exp_dir=exps/second"], cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 encoded, 6 reused" in cache_line(second.stderr)
    assert re.search(r"for (\d+) prompts: 0 encoded, \1 reused", second.stderr)
    assert "text encoders released" in second.stderr
    assert (workdir / "exps/second/ckpts/unet-2.safetensors").exists()


def test_random_crop_trains_uncached_after_one_warning(workdir, tiny_model, cli_in_process):
    data = make_demo_data(workdir / "data", num=2)
    result = cli_in_process(train_args(tiny_model, data, "train.train_steps=1",
                                       "data.dataset1.source.data_source1.crop=random"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "cache_latents" in line]
    assert len(warnings) == 1 and "crop is random" in warnings[0]
    assert "latent cache" not in result.stderr


def test_two_processes_fill_one_disk_cache_in_shares(workdir, tiny_model, cli, cli_in_process, free_port):
    """Under torchrun each rank encodes its share into the shared cache_dir, then reads the others': the entries
    equal a single-process fill file for file, and a second two-process run encodes nothing."""
    from safetensors.torch import load_file

    data = make_demo_data(workdir / "data", num=4)
    common = train_args(tiny_model, data, "data.dataset1.cache_latents=true", "data.dataset1.batch_size=1",
                        "data.dataset1.source.data_source1.random_flip=true")[1:]  # drop "-m"
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"]
    multi = [*torchrun, "hcpdiff.train_ac", *common[1:], "data.dataset1.cache_dir=cache_multi"]
    first = cli(multi + ["exp_dir=exps/first"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 encoded, 4 reused" in cache_line(first.stderr)  # the main process encoded its half, read the rest
    single = cli_in_process(["-m", *common, "data.dataset1.cache_dir=cache_single", "exp_dir=exps/single"], cwd=workdir)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "8 encoded, 0 reused" in cache_line(single.stderr)
    multi_files = sorted(p.name for p in (workdir / "cache_multi").glob("*.safetensors"))
    assert len(multi_files) == 8 and multi_files == sorted(p.name for p in (workdir / "cache_single").glob("*.safetensors"))
    for name in multi_files:
        a, b = load_file(workdir / "cache_multi" / name), load_file(workdir / "cache_single" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    second = cli(multi + ["exp_dir=exps/second"], cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 encoded, 8 reused" in cache_line(second.stderr)
