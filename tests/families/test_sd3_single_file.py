"""An SD3 / SD3.5 base model given as Stability's single checkpoint file (`model.diffusion_model.joint_blocks.0.x_block.
attn.qkv.weight`, ...) plus a local diffusers config folder, as sd3_medium.safetensors and most civitai SD3 fine-tunes
ship. The file is the tiny SD3.5-medium's transformer (dual attention, q / k norms) written in that layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcpdiff.errors import ModelError
from hcpdiff.families import tiny_variant_family
from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_demo_data import make_demo_data
from mmdit_layout import diffusers_to_mmdit


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """(config folder, the original-layout file, the tiny folder it was made from, the transformer's diffusers weights).

    The config folder is the tiny folder without transformer weights; the file also holds a VAE key, as a full
    checkpoint does, which the transformer's loader leaves alone."""
    root = tmp_path_factory.mktemp("sd3_single")
    tiny = tiny_variant_family("sd3.5").make_tiny(root / "tiny", seed=0, variant="sd3.5")
    state = load_model_parts(str(tiny)).transformer.state_dict()
    folder = root / "config"
    shutil.copytree(tiny, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()  # configs only: the file brings the weights
    original = diffusers_to_mmdit(state)
    original["first_stage_model.decoder.conv_in.bias"] = torch.zeros(4)
    path = root / "sd3.5_tiny.safetensors"
    save_file(original, str(path))
    return folder, path, tiny, state


def test_single_file_loads_the_same_transformer_and_the_folders_other_parts(sd3_checkpoint):
    folder, path, tiny, state = sd3_checkpoint
    assert any(key.startswith("model.diffusion_model.joint_blocks.0.x_block.attn2.") for key in load_file(path))
    parts = load_model_parts(str(path), single_file_config=str(folder))
    assert parts.family.name == "sd3" and parts.transformer.dtype == torch.float32
    loaded = parts.transformer.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state), "a weight landed in the wrong place"
    from_folder = load_model_parts(str(tiny))
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        got, want = getattr(parts, part).state_dict(), getattr(from_folder, part).state_dict()
        assert all(torch.equal(got[key], want[key]) for key in want), part
    assert parts.noise_scheduler.config == from_folder.noise_scheduler.config


def test_single_file_without_config_folder_names_the_key(sd3_checkpoint):
    _, path, _, _ = sd3_checkpoint
    with pytest.raises(ModelError, match=r"^model\.pretrained_model_name_or_path: '.*sd3\.5_tiny\.safetensors' is a "
                                         r"Stable Diffusion 3 / 3\.5 transformer in its original single-file layout; "
                                         r"set model\.single_file_config to a local diffusers Stable Diffusion 3"):
        load_model_parts(str(path))


@pytest.mark.e2e
def test_shipped_config_trains_from_the_single_file_without_t5(sd3_checkpoint, workdir, cli_in_process):
    """With drop_t5 the config folder need not hold T5 at all; the run trains the shipped layers (attn2 included)."""
    folder, path, _, _ = sd3_checkpoint
    no_t5 = workdir / "config_no_t5"
    shutil.copytree(folder, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    data = make_demo_data(workdir / "data", num=1)
    result = cli_in_process([
        "-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_sd3.yaml",
        f"model.pretrained_model_name_or_path={path}", f"model.single_file_config={no_t5}", "model.drop_t5=true",
        "mixed_precision=null", f"data.dataset1.source.data_source1.img_root={data}",
        f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0",
        "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
        "data.dataset1.bucket.num_bucket=1", "train.train_steps=2", "transformer_lr=1e-3", "exp_dir=exps/run",
    ], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    lora = load_file(workdir / "exps/run/ckpts/transformer-2.safetensors")
    assert any(".attn2.to_q." in key for key in lora) and any(".attn.add_k_proj." in key for key in lora)
    assert all(float(value.abs().max()) > 0 for key, value in lora.items() if ".lora_B." in key)  # all trained
