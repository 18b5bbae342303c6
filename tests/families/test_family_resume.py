"""Resume is bit-exact for every registered model family: its shipped training config on its tiny model, with random
flips (and crops), a learning-rate warm-up and the disk caches, run for 3 steps; a copy cut after its step-1 state
(mid-epoch) and resumed ends with the uninterrupted run's LoRA, bit for bit, having encoded no prompt. A family that is
registered gets this test with no change here."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from family_data import family_dataset
from hcpdiff.config import load_config
from hcpdiff.families import FAMILIES, Family, family_named
from hcpdiff.lora.layer_select import pattern_selects

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES])
def family_model(request, tiny_models) -> tuple[Family, Path]:
    """(family, its tiny model folder), built by the family's own tiny builder."""
    family = family_named(request.param)
    return family, tiny_models(family.tiny_variants[0])


def two_shipped_layers(family: Family, shipped: Any, model: Path) -> list[str]:
    """The first two layers (by name) of the denoiser that the family's shipped config trains: what resume restores
    does not depend on how many layers train (Qwen-Image's tiny model keeps its 60 blocks, whose 717 shipped layers
    take seconds to attach and save), and the shipped patterns know each family's own layer names."""
    patterns = [pattern for group in shipped[f"lora_{family.denoiser}"] for pattern in group["layers"]]
    layers = []
    for file in sorted((model / family.denoiser).glob("*.safetensors")):
        with safe_open(file, "pt") as weights:  # Linear and Conv2d weights: [out, in] and [out, in, kh, kw]
            layers += [key.removesuffix(".weight") for key in weights.keys()
                       if key.endswith(".weight") and len(weights.get_slice(key).get_shape()) in (2, 4)]
    return sorted(layer for layer in layers if any(pattern_selects(pattern, layer) for pattern in patterns))[:2]


def test_resume_is_bit_exact(family_model, workdir, cli_in_process):
    """The run resumed from the step-1 state replays steps 2 and 3 exactly: their batches (the buckets' order, the
    flips and crops drawn, the latents sampled from the cached ones), noise and timesteps, the optimizer's moments and
    the schedule's learning rates, and with a cache_dir the prompts' embeddings, every one read from the disk (the
    text encoders released before any step). Two prompts a batch: Qwen-Image's entries are each prompt's own tokens,
    padded again per batch. An editing family's input images are drawn, cut and encoded again as the first time; a
    video family trains on the images as 1-frame clips."""
    family, model = family_model
    # 5 images of 3 aspect ratios in 3 buckets (2 + 2 + 1) of ~48x48: 3 batches an epoch, step 1 is mid-epoch
    _, data_args = family_dataset(family, workdir / "data", num=5, condition_area=32 * 32)
    shipped = load_config(REPO_ROOT / family.train_config)
    layers = two_shipped_layers(family, shipped, model)
    assert len(layers) == 2, f"{family.train_config} trains {layers} in {model / family.denoiser}"
    # flips everywhere (a latent cache holds both orientations); random crops where the shipped config encodes every
    # step's images anyway (they would turn its latent cache off)
    crop = [] if shipped.data.dataset1.cache_latents else ["data.dataset1.source.data_source1.crop=random"]
    ckpt = f"ckpts/{family.denoiser}-3.safetensors"
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", family.train_config,
            f"model.pretrained_model_name_or_path={model}", *data_args, "mixed_precision=null", "train.workers=0",
            *crop, "data.dataset1.source.data_source1.random_flip=true",
            'data.dataset1.bucket.target_area=${hcp.eval:"48*48"}', "data.dataset1.bucket.num_bucket=3",
            "data.dataset1.batch_size=2", "data.dataset1.cache_dir=cache", "train.scheduler.num_warmup_steps=2",
            "train.train_steps=3", "train.save_step=1", "train.log_step=1",
            f"lora_{family.denoiser}=[{{lr: 1e-3, rank: 4, alpha: 4, layers: {layers}}}]"]
    full = cli_in_process([*args, "exp_dir=exps/full"], cwd=workdir)
    assert full.returncode == 0, full.stderr[-3000:]
    # a family whose conditioning is the prompt's alone encodes every prompt into cache/text_embeds and releases its
    # text encoders; one whose conditioning reads the batch (SDXL's sizes, an editing model's input images) caches none
    cached = re.search(r"text embeddings cached in cache/text_embeds for (\d+) prompts: \1 encoded, 0 reused",
                       full.stderr)
    if cached:
        assert len(list((workdir / "cache/text_embeds").glob("*.safetensors"))) == int(cached[1])
        assert f"text encoders released ({', '.join(family.text_encoders)})" in full.stderr
    else:
        assert "text embeddings cached" not in full.stderr, full.stderr[-3000:]

    # an interrupted copy: nothing after step 1. Two steps to go: the optimizer's state holds the learning rate of
    # the step after the cut, so only a second step shows the schedule went on
    shutil.copytree(workdir / "exps/full", workdir / "exps/cut")
    for step in (2, 3):
        (workdir / f"exps/cut/ckpts/{family.denoiser}-{step}.safetensors").unlink()
        (workdir / f"exps/cut/state/step-{step}.pt").unlink()
    resumed = cli_in_process([*args, "train.resume=exps/cut"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed \S*exps/cut at step 1\b", resumed.stderr), resumed.stderr[-3000:]
    if cached:
        assert f"for {cached[1]} prompts: 0 encoded, {cached[1]} reused" in resumed.stderr
        assert "text encoders released" in resumed.stderr
    assert (workdir / "exps/cut/cfg-resume-1.yaml").exists() and not (workdir / "exps/cut-1").exists()

    full_lora, resumed_lora = load_file(workdir / "exps/full" / ckpt), load_file(workdir / "exps/cut" / ckpt)
    assert {key.split(".lora_")[0] for key in full_lora if ".lora_" in key} == set(layers)
    assert full_lora.keys() == resumed_lora.keys()
    different = [key for key in full_lora if not full_lora[key].equal(resumed_lora[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    assert all(value.abs().max() > 0 for key, value in full_lora.items() if ".lora_B." in key)  # both layers trained
    # the copied log holds the full run's steps 1-3, then the resumed run's steps 2-3
    losses = re.findall(r"step (\d)/3 loss ([\d.]+)", (workdir / "exps/cut/train.log").read_text())
    assert len(losses) == 5 and losses[3:] == losses[1:3]
