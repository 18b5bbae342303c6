"""End-to-end: training on other model layouts (SD2.x v-prediction, a single checkpoint file) and adapter types."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.tools.make_tiny_model import make_tiny_model

pytestmark = pytest.mark.e2e


def train_args(model: str | Path, data: Path, *extra: str) -> list[str]:
    """train_ac_single on demo_tiny.yaml for 2 steps at 64 px, with the given model and extra overrides."""
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            "train.train_steps=2", "train.save_step=1000", "train.log_step=1",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1", *extra]


def only_exp_dir(workdir: Path) -> Path:
    """The single experiment folder a run created under exps/."""
    runs = sorted((workdir / "exps").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_sd2_v_prediction_model_trains(workdir, tmp_path, cli_in_process):
    """A SD2.x-layout model (v-prediction, linear projections) trains 2 steps and writes its LoRA."""
    model = make_tiny_model(tmp_path / "tiny_sd2", seed=0, family="sd2")
    data = make_demo_data(workdir / "data", num=2)
    result = cli_in_process(train_args(model, data), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    with safe_open(exp / "ckpts" / "unet-2.safetensors", "pt") as opened:
        keys = list(opened.keys())
    assert any(key.endswith("attn2.to_k.lora_A.weight") for key in keys)
    assert "loss" in (exp / "train.log").read_text()


def test_single_file_checkpoint_trains(workdir, tiny_model, cli_in_process):
    """model.pretrained_model_name_or_path: an a1111-layout .safetensors, its configs from model.single_file_config."""
    from hcpdiff.tools.export_single_file import write_original_checkpoint

    single = write_original_checkpoint(tiny_model, workdir / "tiny-a1111.safetensors")
    data = make_demo_data(workdir / "data", num=2)
    result = cli_in_process(train_args(single, data, f"model.single_file_config={tiny_model}"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    with safe_open(exp / "ckpts" / "unet-2.safetensors", "pt") as opened:
        assert opened.metadata()["base_model"] == str(single)


def test_single_file_without_config_offline_fails_in_one_line(workdir, tiny_model, cli_in_process, monkeypatch):
    from hcpdiff.tools.export_single_file import write_original_checkpoint

    single = write_original_checkpoint(tiny_model, workdir / "tiny-a1111.safetensors")
    data = make_demo_data(workdir / "data", num=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli_in_process(train_args(single, data), cwd=workdir)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.single_file_config" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("group, suffix", [
    ("{lr: 1e-3, rank: 4, type: loha, layers: ['re:.*attn2\\.to_[kv]$']}", ".hada_w1_a"),
    ("{lr: 1e-3, rank: 4, type: lokr, layers: ['re:.*attn2\\.to_[kv]$']}", ".lokr_w1"),
    ("{lr: 1e-3, rank: 4, dora: true, layers: ['re:.*attn2\\.to_[kv]$']}", ".lora_magnitude_vector.weight"),
])
def test_adapter_types_train(workdir, tiny_model, cli_in_process, group, suffix):
    """`type: loha`, `type: lokr` and `dora: true` train 2 steps; the checkpoint holds the type's weights, moved."""
    data = make_demo_data(workdir / "data", num=2)
    result = cli_in_process(train_args(tiny_model, data, f"lora_unet=[{group}]"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    with safe_open(exp / "ckpts" / "unet-2.safetensors", "pt") as opened:
        keys = list(opened.keys())
        groups = json.loads(opened.metadata()["groups"])
    assert any(key.endswith("attn2.to_k" + suffix) for key in keys), keys[:8]
    assert groups[0]["type"] == ("lora" if "dora" in group else group.split("type: ")[1].split(",")[0])


def test_locon_example_trains_resnet_convolutions(workdir, tiny_model, cli_in_process):
    data = make_demo_data(workdir / "data", num=2)
    args = train_args(tiny_model, data)
    args[args.index("cfgs/train/examples/demo_tiny.yaml")] = "cfgs/train/examples/locon.yaml"
    result = cli_in_process([*args, "data.dataset1.batch_size=2", "train.workers=0",
                             "data.dataset1.source.data_source1.word_names={pt1: x}"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    with safe_open(exp / "ckpts" / "unet-2.safetensors", "pt") as opened:
        conv_a = [opened.get_tensor(k) for k in opened.keys() if k.endswith("resnets.0.conv1.lora_A.weight")]
    assert conv_a and all(t.shape[1:] == (t.shape[1], 3, 3) for t in conv_a)
