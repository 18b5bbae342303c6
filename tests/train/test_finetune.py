"""Full fine-tuning groups as units: parameter selection, saving beside LoRA weights, reading back, blending."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.lora import (LoraGroupSpec, attach_lora, load_checkpoint, load_lora, lora_state_dict, merge_full_weights,
                          save_lora)
from hcpdiff.lora.state_io import FULL_PARAMS_KEY
from hcpdiff.train.finetune import (FinetuneGroupSpec, enable_finetuning, finetuned_state, load_finetuned,
                                    select_finetune_groups)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(4, 2)


def test_patterns_pick_every_parameter_inside_the_matched_modules():
    groups = select_finetune_groups(Net(), [FinetuneGroupSpec(1e-3, [r"re:blocks\.\d\.norm"]),
                                           FinetuneGroupSpec(1e-4, ["out"])], "unet")
    assert [g.name for g in groups] == ["unet[0]", "unet[1]"]
    assert list(groups[0].named_params) == [f"blocks.{i}.norm.{w}" for i in (0, 1) for w in ("weight", "bias")]
    assert list(groups[1].named_params) == ["out.weight", "out.bias"]
    whole = select_finetune_groups(Net(), [FinetuneGroupSpec(1e-3, [""])], "unet")[0]
    assert len(whole.named_params) == len(list(Net().parameters()))


def test_a_parameter_claimed_twice_and_a_dead_pattern_are_errors():
    with pytest.raises(ConfigError, match=r"'out.weight' is claimed by both unet\[0\] and unet\[1\]"):
        select_finetune_groups(Net(), [FinetuneGroupSpec(1e-3, ["out"]), FinetuneGroupSpec(1e-3, [""])], "unet")
    with pytest.raises(ConfigError, match=r"unet\[0\].layers: pattern 'outt' matches no module.*out"):
        select_finetune_groups(Net(), [FinetuneGroupSpec(1e-3, ["outt"])], "unet")


def test_fine_tuned_tensors_save_beside_lora_and_load_back(tmp_path):
    net = Net()
    finetune = select_finetune_groups(net, [FinetuneGroupSpec(1e-3, [r"re:blocks\.0\.(norm|proj)"])], "unet")
    attach_lora(net, [LoraGroupSpec(lr=1e-3, layers=["out", "blocks.0.proj"], rank=2)], "unet", "lora_unet")
    enable_finetuning(finetune)  # attach_lora froze the base; the group's weights train again
    assert all(p.requires_grad for p in finetune[0].params)
    assert not net.blocks[1].proj.weight.requires_grad
    # blocks.0.proj has both: its adapter and its own (wrapped) weight, saved under the plain name
    state = {**lora_state_dict(net), **finetuned_state(finetune)}
    assert "blocks.0.proj.weight" in state and "blocks.0.proj.lora_A.weight" in state
    path = tmp_path / "unet-1.safetensors"
    save_lora(path, state, {FULL_PARAMS_KEY: json.dumps(list(finetuned_state(finetune)))})
    lora, full, _ = load_checkpoint(path)
    assert set(full) == {f"blocks.0.{m}.{w}" for m in ("norm", "proj") for w in ("weight", "bias")}
    assert set(lora) == set(lora_state_dict(net))
    with pytest.raises(ModelError, match="fully fine-tuned"):
        load_lora(path)

    other = Net()
    groups = select_finetune_groups(other, [FinetuneGroupSpec(1e-3, [r"re:blocks\.0\.(norm|proj)"])], "unet")
    load_finetuned(groups, full, str(path))
    assert torch.equal(other.blocks[0].proj.weight, net.blocks[0].proj.base_layer.weight)
    with pytest.raises(ModelError, match="lacks the trained 'blocks.0.norm.bias'"):
        load_finetuned(groups, {k: v for k, v in full.items() if k != "blocks.0.norm.bias"}, "f")


def test_merge_blends_by_alpha():
    net, trained = Net(), Net()
    base = net.out.weight.detach().clone()
    merge_full_weights(net, {"out.weight": trained.out.weight.detach()}, 0.0, "f")
    assert torch.equal(net.out.weight, base)
    merge_full_weights(net, {"out.weight": trained.out.weight.detach()}, 0.5, "f")
    assert torch.allclose(net.out.weight, (base + trained.out.weight) / 2)
    with pytest.raises(ModelError, match="'nope.weight' names no parameter"):
        merge_full_weights(net, {"nope.weight": base}, 1.0, "f")
