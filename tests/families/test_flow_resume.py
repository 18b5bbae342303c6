"""Resume is bit-exact on every flow-matching family (FLUX.1, SD3, Qwen-Image), from the disk text cache: a run cut
after its step-2 state and resumed ends with the uninterrupted run's LoRA, bit for bit, having encoded no prompt."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hcpdiff.families import family_named
from hcpdiff.tools.make_demo_data import make_demo_data

# each family's tiny variant of the same name: FLUX.1-dev (guidance embedding, resolution shift), SD3 with T5
FAMILIES = ("flux", "sd3", "qwen_image")
# what resume restores does not depend on how many layers train: two blocks' attention, in every family's names
# (Qwen-Image's tiny model keeps its 60 blocks, whose 717 shipped layers take seconds to attach and save)
LAYERS = r"re:transformer_blocks\.[01]\.attn\.(to_q|to_k|to_v|to_out\.0)"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_models) -> tuple[str, Path]:
    """(family name, its tiny model folder)."""
    return request.param, tiny_models(request.param)


def assert_same_loras(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    different = [key for key in left if not left[key].equal(right[key])]
    assert not different, f"{a.name}: {len(different)} tensors differ, e.g. {different[0]}"
    assert any(float(value.abs().max()) > 0 for key, value in left.items() if ".lora_B." in key)  # it trained


@pytest.mark.e2e
def test_resume_from_the_disk_text_cache_is_bit_exact(workdir, tiny, cli_in_process):
    """With a cache_dir, the first run encodes every prompt into cache_dir/text_embeds and releases the text encoders;
    the run resumed from its step-2 state (mid-epoch) encodes no prompt at all (every entry read from the disk,
    encoders released before any step), logs the same losses for steps 3-4 and ends with the uninterrupted run's
    LoRA. Two prompts a batch: Qwen-Image's entries are each prompt's own tokens, padded again per batch."""
    name, model = tiny
    family = family_named(name)
    data = make_demo_data(workdir / "data", num=5)  # 3 batches an epoch: step 2 is mid-epoch
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", family.train_config,
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"32*32"}',
            "data.dataset1.bucket.num_bucket=1", "data.dataset1.batch_size=2", "mixed_precision=null",
            "train.train_steps=4", "train.save_step=2", "train.log_step=1",
            "data.dataset1.cache_dir=cache", f"lora_transformer=[{{lr: 1e-3, rank: 4, alpha: 4, layers: ['{LAYERS}']}}]"]
    full = cli_in_process([*args, "exp_dir=exps/full"], cwd=workdir)
    assert full.returncode == 0, full.stderr[-3000:]
    filled = re.search(r"text embeddings cached in cache/text_embeds for (\d+) prompts: \1 encoded, 0 reused", full.stderr)
    assert filled, full.stderr[-3000:]
    prompts = int(filled[1])
    assert len(list((workdir / "cache" / "text_embeds").glob("*.safetensors"))) == prompts
    assert f"text encoders released ({', '.join(family.text_encoders)})" in full.stderr
    shutil.copytree(workdir / "exps/full", workdir / "exps/cut")  # an interrupted copy: nothing after step 2
    for path in [workdir / "exps/cut/ckpts/transformer-4.safetensors", workdir / "exps/cut/state/step-4.pt"]:
        path.unlink()
    resumed = cli_in_process([*args, "train.resume=exps/cut"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"for {prompts} prompts: 0 encoded, {prompts} reused" in resumed.stderr
    assert "text encoders released" in resumed.stderr and "resumed" in resumed.stderr
    assert_same_loras(workdir / "exps/full/ckpts/transformer-4.safetensors",
                      workdir / "exps/cut/ckpts/transformer-4.safetensors")
    # the copied log holds the full run's steps 1-4, then the resumed run's steps 3-4
    losses = re.findall(r"step (\d)/4 loss ([\d.]+)", (workdir / "exps/cut/train.log").read_text())
    assert losses[4:] == losses[2:4] and len(losses) == 6
