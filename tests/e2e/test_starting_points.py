"""Starting points: continue from a LoRA (model.init_lora) and fuse preset LoRAs into the base (model.preset_lora)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.config import load_config
from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.trainer import Trainer

pytestmark = pytest.mark.e2e


@pytest.fixture
def overrides(workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=2)
    return [f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}']


def test_init_lora_continues_from_saved_weights(workdir, overrides, cli_in_process):
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml", *overrides]
    first = cli_in_process([*args, "train.train_steps=2", "exp_dir=exps/first"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = workdir / "exps/first/ckpts/unet-2.safetensors"
    # lr 0: the continued run must leave the loaded weights exactly as they were.
    again = cli_in_process([*args, "train.train_steps=1", "unet_lr=0", "exp_dir=exps/again",
                            f"model.init_lora={{unet: {saved}}}"], cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = load_file(saved), load_file(workdir / "exps/again/ckpts/unet-1.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_lora_for_an_untrained_part_is_refused(workdir, overrides, cli_in_process):
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                                        *overrides, "model.init_lora={text_encoder: x.safetensors}"], cwd=workdir)
    assert result.returncode == 2 and "model.init_lora.text_encoder" in result.stderr


def test_preset_lora_is_fused_into_the_base(workdir, overrides, cli_in_process, tiny_model):
    first = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml", *overrides,
                            "train.train_steps=2", "unet_lr=1e-2", "exp_dir=exps/first"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    preset = workdir / "exps/first/ckpts/unet-2.safetensors"
    cfg = load_config("cfgs/train/examples/demo_tiny.yaml",
                      [*overrides, "exp_dir=exps/fused", f"model.preset_lora=[{{path: {preset}, alpha: 0.5}}]"])
    trainer = Trainer(cfg, single_process=True)
    trainer.setup()
    state = load_file(preset)
    name = next(k for k in state if k.endswith(".lora_A.weight")).removesuffix(".lora_A.weight")
    base = load_model_parts(str(tiny_model)).unet.get_submodule(name).weight
    lora_a, lora_b, alpha = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], state[f"{name}.alpha"]
    expected = base + 0.5 * float(alpha) / lora_a.shape[0] * (lora_b @ lora_a)
    fused = trainer.parts.unet.get_submodule(name).base_layer.weight
    assert torch.allclose(fused, expected, atol=1e-6)
    assert not torch.allclose(fused, base)
    trainer.cleanup()
