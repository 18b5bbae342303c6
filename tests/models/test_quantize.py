"""model.quantize: a tiny FLUX trains with its frozen transformer stored int8 / fp8 (torchao), the loss falls, the LoRA
file is the unquantized run's format and renders on the unquantized model; bad values are one error line."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.errors import ConfigError
from hcpdiff.models import load_model_parts
from hcpdiff.models.quantize import is_quantized, quantize_linear_weights, quantize_parts
from hcpdiff.tools.make_demo_data import make_demo_data

pytest.importorskip("torchao")
REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


@pytest.fixture(scope="module")
def tiny_flux(tiny_models) -> Path:
    return tiny_models("flux")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quantize")
    (root / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    make_demo_data(root / "data", num=1)
    return root


def train_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_flux.yaml",
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
            "data.dataset1.bucket.num_bucket=1", "mixed_precision=null", "train.log_step=1", "train.save_step=1000",
            "transformer_lr=1e-2", "train.loss.logit_std=0.3", *extra]


@pytest.fixture(scope="module")
def runs(tiny_flux, workspace, cli_in_process) -> dict[str, Path]:
    """Experiment folders: int8 and fp8 runs overfitting one image, and a 1-step unquantized run for its keys."""
    folders = {}
    for name, steps, extra in (("int8", STEPS, ["model.quantize={transformer: int8}"]),
                               ("fp8", STEPS, ["model.quantize={transformer: fp8}"]),
                               ("plain", 1, [])):
        done = cli_in_process(train_args(tiny_flux, workspace / "data", f"train.train_steps={steps}",
                                         f"exp_dir=exps/{name}", *extra), cwd=workspace)
        assert done.returncode == 0, done.stderr[-3000:]
        folders[name] = workspace / "exps" / name
    return folders


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_transformer_trains_and_the_loss_falls(runs, kind):
    log = (runs[kind] / "train.log").read_text()
    assert f"model.quantize: 50 of the transformer's 50 Linear layers store {kind} weights" in log
    losses = [float(value) for value in re.findall(rf"step \d+/{STEPS} loss ([\d.]+)", log)]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, (first, last)


@pytest.mark.e2e
def test_lora_file_has_the_unquantized_runs_keys_and_renders_on_the_unquantized_model(runs, tiny_flux, workspace,
                                                                                        cli_in_process):
    quantized = load_file(runs["int8"] / "ckpts" / f"transformer-{STEPS}.safetensors")
    plain = load_file(runs["plain"] / "ckpts" / "transformer-1.safetensors")
    assert quantized.keys() == plain.keys()
    assert all(quantized[key].dtype == plain[key].dtype == torch.float32 for key in plain)  # adapters stay fp32
    out = workspace / "renders"
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img_flux.yaml",
                           f"pretrained_model={tiny_flux}", "dtype=fp32",
                           f"lora_path={runs['int8'] / 'ckpts' / f'transformer-{STEPS}.safetensors'}",
                           "prompt='a red circle'", f"save.out_dir={out}", "infer_args.width=64",
                           "infer_args.height=64", "infer_args.num_inference_steps=2"], cwd=workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("*.png"))) == 1


def test_frozen_linear_weights_are_stored_quantized(tiny_flux):
    parts = load_model_parts(str(tiny_flux))
    counts = quantize_parts(parts.components, {"transformer": "int8", "text_encoder_2": "fp8"}, torch.float32)
    assert counts["transformer"][0] == counts["transformer"][1] > 0
    layer = parts.components["transformer"].transformer_blocks[0].attn.to_q
    assert is_quantized(layer.weight) and layer.weight.qdata.dtype == torch.int8
    t5_layer = next(m for m in parts.components["text_encoder_2"].modules() if isinstance(m, torch.nn.Linear))
    assert is_quantized(t5_layer.weight) and t5_layer.weight.qdata.dtype == torch.float8_e4m3fn
    clip_layer = next(m for m in parts.components["text_encoder"].modules() if isinstance(m, torch.nn.Linear))
    assert not is_quantized(clip_layer.weight)  # a part not named keeps plain weights


def test_nf4_quantizes_whole_blocks_and_a_peft_lora_trains_on_it():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 24)).requires_grad_(False)
    assert quantize_linear_weights(model, "nf4", "model.quantize.x") == (1, 2)  # 128*24 is not whole 256x64 blocks
    assert type(model[0].weight).__name__ == "NF4Tensor" and not is_quantized(model[1].weight)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["0", "1"]))
    loss = lora(torch.randn(2, 128)).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)


def test_missing_torchao_is_one_error_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ConfigError, match=r"^model.quantize.transformer: int8 quantization needs torchao"):
        quantize_linear_weights(torch.nn.Linear(4, 4).requires_grad_(False), "int8", "model.quantize.transformer")


@pytest.mark.e2e
@pytest.mark.parametrize("override, message", [
    ("model.quantize={transformer: int3}", "error: model.quantize.transformer: 'int3' is not a quantization; use one "
                                            "of int8, fp8, nf4"),
    ("model.quantize={unet: int8}", "error: model.quantize.unet: a FLUX.1 (dev / schnell) model has no part 'unet' to "
                                     "quantize; its parts are transformer, text_encoder, text_encoder_2"),
])
def test_bad_quantize_values_are_one_error_line(tiny_flux, workspace, cli_in_process, one_error_line, override,
                                                message):
    line = one_error_line(cli_in_process(train_args(tiny_flux, workspace / "data", "train.train_steps=1", override,
                                                    "exp_dir=exps/refused"), cwd=workspace))
    assert line.startswith(message), line


def test_text_cache_identity_reads_quantized_weights_and_tells_them_from_plain_ones(tiny_flux):
    """The text cache's key hashes each encoder's weights: a quantized T5 (fp8) has an identity, not the plain one's."""
    from hcpdiff.data.tensor_store import weights_identity

    parts = load_model_parts(str(tiny_flux))
    plain = weights_identity(parts.components["text_encoder_2"], "t5")
    quantize_parts(parts.components, {"text_encoder_2": "fp8"}, torch.float32)
    quantized = weights_identity(parts.components["text_encoder_2"], "t5")
    assert quantized != plain and quantized == weights_identity(parts.components["text_encoder_2"], "t5")
