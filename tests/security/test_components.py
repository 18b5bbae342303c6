"""A config cannot call arbitrary Python: `_target_` is limited to components, optimizers and hcpdiff's own code."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from hcpdiff.config import check_targets, instantiate
from hcpdiff.errors import ConfigError


class Payload:
    """Unpickling this creates a marker file: proof that `torch.load(weights_only=False)` ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.e2e
def test_visualizer_refuses_builtins_open_and_leaves_the_file_alone(cli_in_process, workdir, tiny_model,
                                                                    one_error_line):
    victim = workdir / "precious.txt"
    victim.write_text("keep me")
    result = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml",
                             f"pretrained_model={tiny_model}", "prompt=a cat", "save.out_dir=imgs",
                             f"new_components={{vae: {{_target_: builtins.open, file: {victim}, mode: w}}}}"],
                            cwd=workdir)
    error = one_error_line(result)
    assert "new_components.vae._target_" in error and "builtins.open" in error
    assert victim.read_text() == "keep me"
    assert not (workdir / "imgs").exists()


@pytest.mark.e2e
def test_visualizer_refuses_torch_load_and_the_pickle_never_runs(cli_in_process, workdir, tiny_model, one_error_line):
    marker = workdir / "pwned"
    with open(workdir / "evil.pt", "wb") as file:
        pickle.dump(Payload(marker), file)
    result = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml",
                             f"pretrained_model={tiny_model}", "prompt=a cat", "save.out_dir=imgs",
                             "new_components={unet: {_target_: torch.load, f: evil.pt, weights_only: false}}"],
                            cwd=workdir)
    error = one_error_line(result)
    assert "new_components.unet._target_" in error and "torch.load" in error
    assert not marker.exists()


@pytest.mark.e2e
def test_training_config_refuses_a_payload_target_before_anything_runs(cli_in_process, workdir, tiny_model,
                                                                       one_error_line):
    marker = workdir / "pwned"
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                             f"model.pretrained_model_name_or_path={tiny_model}",
                             f"train.optimizer={{_target_: os.system, command: 'touch {marker}'}}"], cwd=workdir)
    error = one_error_line(result)
    assert "train.optimizer._target_" in error and "os.system" in error
    assert not marker.exists()
    assert not (workdir / "exps").exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.run", "torch.load", "torch.save",
                                    "diffusers.utils.load_image", "pickle.loads", "hydra.utils.instantiate"])
def test_non_components_are_refused_with_key_and_target(target):
    with pytest.raises(ConfigError) as info:
        check_targets({"new_components": {"vae": {"_target_": target}}})
    message = str(info.value)
    assert message.startswith(f"`new_components.vae._target_`: '{target}' is not allowed") and "\n" not in message


def test_modules_outside_the_allowed_roots_are_not_even_imported():
    import sys

    assert "antigravity" not in sys.modules  # importing it opens a web browser
    with pytest.raises(ConfigError, match="'antigravity.geohash' is not allowed"):
        check_targets({"x": {"_target_": "antigravity.geohash"}})
    assert "antigravity" not in sys.modules


def test_instantiate_checks_too_even_without_check_targets(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    with pytest.raises(ConfigError, match=r"^`new_components.vae._target_`: 'builtins.open' is not allowed"):
        instantiate({"_target_": "builtins.open", "file": str(victim), "mode": "w"}, "new_components.vae")
    with pytest.raises(ConfigError, match=r"`outer.target_size._target_`: 'builtins.open' is not allowed"):
        instantiate({"_target_": "hcpdiff.data.FixedBucket", "target_size": {"_target_": "builtins.open",
                     "file": str(victim), "mode": "w"}}, "outer")
    assert victim.read_text() == "keep me"


def test_remote_code_arguments_are_refused():
    with pytest.raises(ConfigError, match=r"`new_components.tokenizer.trust_remote_code`"):
        check_targets({"new_components": {"tokenizer": {"_target_": "transformers.AutoTokenizer.from_pretrained",
                                                        "pretrained_model_name_or_path": "x",
                                                        "trust_remote_code": True}}})


@pytest.mark.parametrize("node", [
    {"_target_": "diffusers.DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    {"_target_": "diffusers.AutoencoderKL.from_pretrained", "pretrained_model_name_or_path": "vae"},
    {"_target_": "diffusers.UNet2DConditionModel.from_single_file", "pretrained_model_link_or_path": "x.safetensors"},
    {"_target_": "diffusers.EulerDiscreteScheduler.from_config", "config": {}},
    {"_target_": "transformers.CLIPTextModel.from_pretrained", "pretrained_model_name_or_path": "te"},
    {"_target_": "transformers.AutoTokenizer.from_pretrained", "pretrained_model_name_or_path": "tok"},
    {"_target_": "transformers.CLIPImageProcessor"},
    {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01},
    {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 10},
    {"_target_": "hcpdiff.data.RatioBucket.from_files", "_partial_": True, "target_area": 4096, "num_bucket": 2},
])
def test_components_optimizers_and_project_targets_are_allowed(node):
    check_targets({"x": node})


def test_allowed_component_still_builds():
    scheduler = instantiate({"_target_": "diffusers.DDIMScheduler", "num_train_timesteps": 10}, "new_components.scheduler")
    assert type(scheduler).__name__ == "DDIMScheduler"
    optimizer = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, "train.optimizer")
    assert isinstance(optimizer([torch.nn.Parameter(torch.zeros(1))]), torch.optim.SGD)
