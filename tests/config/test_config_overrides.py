"""Command-line overrides: `=` needs an existing key, `+` adds, `~` removes; values are YAML."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hcpdiff.config import ConfigError, load_config, load_config_with_origins, parse_overrides

BASE = """
    unet_lr: 1e-4
    train:
      lr: ${unet_lr}
      train_steps: 1000
      optimizer: {_target_: torch.optim.AdamW, weight_decay: 1e-3}
    word_names: {}
    lora_unet:
      - lr: 1e-4
        rank: 4
        layers: [a, b]
"""


@pytest.fixture
def cfg_file(write):
    write("cfgs/base.yaml", BASE)
    return write("cfgs/run.yaml", "_base_: cfgs/base.yaml\ntrain: {train_steps: 10}\n")


def test_set_existing_keys_with_yaml_values(cfg_file):
    cfg = load_config(cfg_file, [
        "unet_lr=2e-4", "train.train_steps=20", "word_names={pt1: cat, pt2: dog}",
        "lora_unet.0.layers=[x, 're:.*\\.ff$']", "lora_unet.0.rank=0.25", "train.optimizer=null",
    ])
    assert cfg.unet_lr == 0.0002 and isinstance(cfg.unet_lr, float)
    assert cfg.train.lr == 0.0002
    assert cfg.train.train_steps == 20
    assert OmegaConf.to_container(cfg.word_names) == {"pt1": "cat", "pt2": "dog"}
    assert list(cfg.lora_unet[0].layers) == ["x", "re:.*\\.ff$"]
    assert cfg.lora_unet[0].rank == 0.25
    assert cfg.train.optimizer is None


def test_unknown_key_suggests_nearest_and_plus(cfg_file):
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, ["train.trian_steps=5"])
    message = str(info.value)
    assert "'train.trian_steps' does not exist" in message
    assert "did you mean 'train.train_steps'?" in message
    assert "use +key=value to add a new key" in message


def test_unknown_parent_key_is_refused(cfg_file):
    with pytest.raises(ConfigError, match=r"'trian\.lr' does not exist \(did you mean 'train\.lr'\?\)"):
        load_config(cfg_file, ["trian.lr=1"])


def test_plus_adds_new_keys_and_parents(cfg_file):
    cfg = load_config(cfg_file, ["+train.scale_lr=true", "+logger.tensorboard.dir=tb"])
    assert cfg.train.scale_lr is True
    assert cfg.logger.tensorboard.dir == "tb"


def test_plus_on_existing_key_is_refused_with_hint(cfg_file):
    with pytest.raises(ConfigError, match=r"'train\.lr' already exists; drop the \+ to override it \(train\.lr=1\)"):
        load_config(cfg_file, ["+train.lr=1"])


def test_plus_plus_sets_whether_or_not_present(cfg_file):
    cfg = load_config(cfg_file, ["++train.lr=1", "++train.new=2"])
    assert (cfg.train.lr, cfg.train.new) == (1, 2)


def test_tilde_removes_and_refuses_unknown(cfg_file):
    cfg = load_config(cfg_file, ["~train.optimizer", "~word_names"])
    assert "optimizer" not in cfg.train and "word_names" not in cfg
    with pytest.raises(ConfigError, match=r"'train\.optimzer' does not exist \(did you mean 'train\.optimizer'\?\)"):
        load_config(cfg_file, ["~train.optimzer"])


def test_overrides_apply_in_order(cfg_file):
    cfg = load_config(cfg_file, ["train.train_steps=1", "train.train_steps=2"])
    assert cfg.train.train_steps == 2


@pytest.mark.parametrize("text, message", [
    ("train.lr", "is not of the form key=value"),
    ("train..lr=1", "empty key part"),
    ("~train.lr=1", "takes no value"),
    ("train.lr=[1, 2", "not valid YAML"),
])
def test_malformed_overrides(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([text])


def test_setting_below_a_scalar_is_refused(cfg_file):
    with pytest.raises(ConfigError, match=r"'train\.lr' holds a str, not a mapping"):
        load_config(cfg_file, ["train.lr.x=1"])


def test_parse_overrides_values():
    parsed = parse_overrides(["a=2e-4", "b=null", "c=[1, 2]", "d=", "e=${x}", "+f=1", "~g"])
    assert [(o.kind, o.key, o.value) for o in parsed] == [
        ("set", "a", 0.0002), ("set", "b", None), ("set", "c", [1, 2]), ("set", "d", ""),
        ("set", "e", "${x}"), ("add", "f", 1), ("delete", "g", None)]


def test_origins_name_files_and_command_line(write):
    write("cfgs/base.yaml", BASE)
    write("cfgs/examples/run.yaml", "_base_: cfgs/base.yaml\ntrain: {train_steps: 10}\n"
                                    "lora_unet: [{lr: 2e-4, layers: [c]}]\n")
    cfg, origins = load_config_with_origins("cfgs/examples/run.yaml", ["unet_lr=3e-4", "+extra.x=1"])
    assert origins["unet_lr"] == "command line"
    assert origins["extra.x"] == "command line"
    assert origins["train.lr"] == "cfgs/base.yaml"
    assert origins["train.train_steps"] == "cfgs/examples/run.yaml"
    assert origins["train.optimizer.weight_decay"] == "cfgs/base.yaml"
    assert origins["lora_unet.0.lr"] == "cfgs/examples/run.yaml"
    assert origins["lora_unet.0.layers.0"] == "cfgs/examples/run.yaml"
    assert origins["word_names"] == "cfgs/base.yaml"
    # every leaf has an origin, and nothing else does
    from hcpdiff.config.keypaths import iter_leaves
    assert set(origins) == {path for path, _ in iter_leaves(OmegaConf.to_container(cfg))}


def test_origins_follow_delete_and_interpolated_mappings(write):
    write("base.yaml", "opt: {a: 1, b: 2}\nsrc: {x: 1}\n")
    write("top.yaml", "_base_: base.yaml\nopt: {_delete_: true, c: 3}\ncopy: ${src}\n")
    cfg, origins = load_config_with_origins("top.yaml")
    assert origins == {"opt.c": "top.yaml", "src.x": "base.yaml", "copy.x": "top.yaml"}
