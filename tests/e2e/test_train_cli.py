"""End-to-end: the training commands run as a user runs them, on the tiny model and datasets made here."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}(-\d+)?$")

# The reference guide's lora1.yaml, word for word except the model and data paths.
GUIDE_LORA1 = """\
# 继承lora_conventional.yaml
_base_:
  - cfgs/train/examples/lora_conventional.yaml

# 修改学习率
unet_lr: 0.0006

train:
  # 设置训练轮数
  train_epochs: 20

model:
  # 底模路径，需要diffusers格式，支持huggingface在线模型
  pretrained_model_name_or_path: '{model}'
  # 句子长度拓展倍数，1倍最长75个词，如果标注很长可以适当调大
  tokenizer_repeats: 1

data:
  dataset1:
    # 每一批的图像数量，根据显存大小调整
    batch_size: 4

    source:
      data_source1:
        # 训练图片路径
        img_root: '{data}'
        # 图片标注路径，null则表示没有标注
        # 可以直接填写标注文件所在文件夹，或填写具体的标注文件路径
        caption_file: '{captions}'

        # 设置lora的触发词
        word_names:
          pt1: pt-cat1

    bucket:
      # 预期训练分辨率
      target_area: ${{hcp.eval:"512*768"}}
      # 按宽高比分组数量，不要超过训练图片数量
      num_bucket: 5
"""

# Small and quick on a CPU; the guide's own values stay in the file, these come from the command line.
FAST = ["train.train_steps=null", "train.workers=0", "train.log_step=1",
        'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1"]


def only_exp_dir(workdir: Path) -> Path:
    """The single experiment folder a run created under exps/."""
    runs = sorted((workdir / "exps").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def write_lora1(workdir: Path, tiny_model: Path, data: Path, captions: str | Path) -> Path:
    """lora1.yaml as the guide writes it, under cfgs-like path `lora1.yaml` in the working directory."""
    path = workdir / "lora1.yaml"
    path.write_text(GUIDE_LORA1.format(model=tiny_model, data=data, captions=captions), encoding="utf-8")
    return path


def test_guide_lora1_with_accelerate_launch(workdir, tiny_model, cli):
    """The guide's command: accelerate launch -m hcpdiff.train_ac_single --cfg lora1.yaml unet_lr=... epochs=..."""
    data = make_demo_data(workdir / "train_data", num=4)
    write_lora1(workdir, tiny_model, data, data)
    result = cli(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "hcpdiff.train_ac_single", "--cfg", "lora1.yaml",
                  "unet_lr=2e-4", "train.train_epochs=2", *FAST], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]

    exp = only_exp_dir(workdir)
    assert TIMESTAMP.match(exp.name)
    assert {"cfg.yaml", "ckpts", "tblog", "train.log", "lora_layers.json"} <= {p.name for p in exp.iterdir()}
    assert list((exp / "tblog").rglob("events.out.tfevents.*"))

    # 4 images, batch 4, 2 epochs -> 2 optimizer steps; the final checkpoint is written, the U-Net only.
    ckpts = sorted(p.name for p in (exp / "ckpts").iterdir())
    assert ckpts == ["unet-2.safetensors"]

    state = load_file(exp / "ckpts" / "unet-2.safetensors")
    layers = {key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key}
    suffixes = {re.sub(r"^.*\.(attn\d)\.", r"\1.", name) for name in layers if ".attn" in name}
    assert suffixes == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert any(name.endswith("ff.net.0.proj") for name in layers)
    assert any(name.endswith("ff.net.2") for name in layers)
    for name in layers:
        down, up, alpha = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], state[f"{name}.alpha"]
        assert down.shape[0] == 8 and up.shape[1] == 8  # lora_conventional: rank 8
        assert float(alpha) == 8.0
    with safe_open(exp / "ckpts" / "unet-2.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hcpdiff.lora" and meta["part"] == "unet" and meta["step"] == "2"

    # cfg.yaml is the resolved config: overrides applied, resolvers evaluated.
    from omegaconf import OmegaConf

    saved = OmegaConf.load(exp / "cfg.yaml")
    assert saved.unet_lr == pytest.approx(2e-4)
    assert saved.lora_unet[0].lr == pytest.approx(2e-4)
    assert saved.data.dataset1.bucket.target_area == 4096
    assert saved.data.dataset1.source.data_source1.word_names.pt1 == "pt-cat1"

    log = (exp / "train.log").read_text()
    assert "step 2/2" in log and "lr 0.0002" in log


def test_guide_advanced_groups_train_unet_and_text_encoder(workdir, tiny_model, cli_in_process):
    """The guide's advanced block: to_k/to_v/ff rank 16 alpha 2, and a text-encoder group with dropout (the entry
    point in-process: test_guide_lora1_with_accelerate_launch starts the real processes)."""
    data = make_demo_data(workdir / "data", num=2, captions="json")
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_unet_te.yaml",
                  f"model.pretrained_model_name_or_path={tiny_model}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data / 'captions.json'}",
                  "data.dataset1.batch_size=2", "train.train_steps=3", "train.save_step=2", "unet_lr=1e-2",
                  "lora_text_encoder.0.lr=1e-2", "train.gradient_accumulation_steps=2",
                  "model.gradient_checkpointing=true", *FAST[1:]], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == [
        "text_encoder-2.safetensors", "text_encoder-3.safetensors", "unet-2.safetensors", "unet-3.safetensors"]

    unet = load_file(exp / "ckpts" / "unet-3.safetensors")
    unet_layers = {k.rsplit(".lora_", 1)[0] for k in unet if ".lora_" in k}
    assert unet_layers and all(re.search(r"(\.to_k|\.to_v|\.ff\.net\.0\.proj|\.ff\.net\.2)$", n) for n in unet_layers)
    assert all(unet[f"{n}.lora_A.weight"].shape[0] == 16 and float(unet[f"{n}.alpha"]) == 2.0 for n in unet_layers)

    te = load_file(exp / "ckpts" / "text_encoder-3.safetensors")
    te_layers = {k.rsplit(".lora_", 1)[0] for k in te if ".lora_" in k}
    assert any(n.endswith("self_attn.q_proj") for n in te_layers) and any(n.endswith("mlp.fc1") for n in te_layers)
    # Both parts trained, with gradient checkpointing on: the up-projections (zero at start) moved in every layer.
    for state, layers in ((unet, unet_layers), (te, te_layers)):
        assert all(state[f"{n}.lora_B.weight"].abs().sum() > 0 for n in layers)

    log = (exp / "train.log").read_text()
    assert "total batch size 4 (batch 2 x accumulation 2 x processes 1)" in log
    assert "step 3/3" in log  # optimizer steps, not micro-batches
    groups = json.loads((exp / "lora_layers.json").read_text())
    assert set(groups) == {"lora_unet", "lora_text_encoder"}
    assert len(groups["lora_unet"][0]["layers"]) == len(unet_layers)


def train_losses(train_log: str) -> list[float]:
    """The per-step losses in train.log, in order."""
    return [float(m) for m in re.findall(r"step \d+/\d+ loss ([0-9.]+)", train_log)]


def test_loss_falls_when_overfitting_one_image(workdir, tiny_model, cli_in_process):
    """One image, one caption, a high lr: the denoising loss must come down (seen: 1.01 -> 0.46)."""
    data = make_demo_data(workdir / "one", num=1)
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                  f"model.pretrained_model_name_or_path={tiny_model}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data}",
                  "data.dataset1.batch_size=1", "train.train_steps=80", "train.save_step=1000",
                  "train.log_step=1", "train.scheduler.num_warmup_steps=0",
                  # every Linear / Conv2d of the random U-Net, so the adapter has the capacity to fit
                  "lora_unet=[{lr: 3e-3, rank: 4, layers: ['']}]",
                  "train.scheduler.name=constant", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}'],
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses((only_exp_dir(workdir) / "train.log").read_text())
    assert len(losses) == 80
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)


def test_saved_cfg_reproduces_the_run(workdir, tiny_model, cli_in_process):
    """Training again from exps/<ts>/cfg.yaml gives the same LoRA weights, bit for bit, on a CPU."""
    data = make_demo_data(workdir / "data", num=3)
    first = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                            f"model.pretrained_model_name_or_path={tiny_model}",
                            f"data.dataset1.source.data_source1.img_root={data}",
                            f"data.dataset1.source.data_source1.caption_file={data}",
                            "train.train_steps=3", "exp_dir=exps/first",
                            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}'], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "exps/first/cfg.yaml", "exp_dir=exps/again"],
                           cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_file(workdir / "exps/first/ckpts/unet-3.safetensors")
    b = load_file(workdir / "exps/again/ckpts/unet-3.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B.weight"))


def test_existing_exp_dir_is_never_reused(workdir, tiny_model, cli_in_process):
    """Two runs asking for the same folder: the second gets a -1 suffix; the first's files stay intact."""
    data = make_demo_data(workdir / "data", num=2)
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=1",
            "exp_dir=exps/same", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}']
    assert cli_in_process(args, cwd=workdir).returncode == 0
    before = (workdir / "exps/same/ckpts/unet-1.safetensors").read_bytes()
    second = cli_in_process(args, cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (workdir / "exps/same-1/ckpts/unet-1.safetensors").exists()
    assert (workdir / "exps/same/ckpts/unet-1.safetensors").read_bytes() == before


def test_fp16_on_cpu_falls_back_with_one_warning(workdir, tiny_model, cli_in_process):
    data = make_demo_data(workdir / "data", num=1)
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                             f"model.pretrained_model_name_or_path={tiny_model}", "mixed_precision=fp16",
                             f"data.dataset1.source.data_source1.img_root={data}",
                             f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=1",
                             "data.dataset1.batch_size=1", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}'],
                            cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fp16") == 1 and "fp32" in result.stderr


def test_missing_captions_warn_once_and_train(workdir, tiny_model, cli_in_process):
    """Images without a caption train on the template alone, after one warning line naming them."""
    data = make_demo_data(workdir / "data", num=4)
    (data / "1.txt").unlink()
    (data / "3.txt").unlink()
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                             f"model.pretrained_model_name_or_path={tiny_model}",
                             f"data.dataset1.source.data_source1.img_root={data}",
                             f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=1",
                             'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}'], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "no caption" in line]
    assert len(warnings) == 1 and "2 of 4" in warnings[0] and "1.png" in warnings[0]


def test_two_processes_write_one_experiment_folder(workdir, tiny_model, cli, free_port):
    """hcpdiff.train_ac under torchrun with two CPU processes (gloo): one folder, one set of checkpoints."""
    data = make_demo_data(workdir / "data", num=4)
    result = cli(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "hcpdiff.train_ac",
                  "--cfg", "cfgs/train/examples/demo_tiny.yaml", f"model.pretrained_model_name_or_path={tiny_model}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=2",
                  "data.dataset1.batch_size=1", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
                  "train.scale_lr=true", "unet_lr=1e-4"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = only_exp_dir(workdir)
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == ["unet-2.safetensors"]
    log = (exp / "train.log").read_text()
    assert "total batch size 2 (batch 1 x accumulation 1 x processes 2)" in log
    assert "group lora_unet[0]: lr 0.0002 (effective)" in log  # scale_lr: 1e-4 x total batch 2


def test_single_entry_refuses_several_processes(workdir, tiny_model, cli, free_port):
    data = make_demo_data(workdir / "data", num=2)
    result = cli(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                  "hcpdiff.train_ac_single",
                  "--cfg", "cfgs/train/examples/demo_tiny.yaml", f"model.pretrained_model_name_or_path={tiny_model}",
                  f"data.dataset1.source.data_source1.img_root={data}",
                  f"data.dataset1.source.data_source1.caption_file={data}"], cwd=workdir)
    assert result.returncode != 0
    assert "error: hcpdiff.train_ac_single runs one process; launch hcpdiff.train_ac" in result.stderr
    # torchrun reports the failed children with its own traceback; none comes from our code
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File") and "hcpdiff" in line]
    assert not (workdir / "exps").exists()
