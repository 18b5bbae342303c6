"""`_base_` inheritance: merge order, list replacement, `_delete_`, base lookup and file errors."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hcpdiff.config import ConfigError, load_config


def plain(cfg):
    return OmegaConf.to_container(cfg)


def test_bases_merge_in_order_and_file_wins(write):
    write("a.yaml", """
        model: {name: a, width: 1}
        only_a: 1
    """)
    write("b.yaml", """
        model: {name: b, depth: 2}
    """)
    write("top.yaml", """
        _base_: [a.yaml, b.yaml]
        model: {width: 3}
    """)
    cfg = load_config("top.yaml")
    assert plain(cfg) == {"model": {"name": "b", "width": 3, "depth": 2}, "only_a": 1}
    assert "_base_" not in cfg


def test_lists_replace_instead_of_merging(write):
    write("base.yaml", "layers: [a, b, c]\ngroups: [{lr: 1}, {lr: 2}]\n")
    write("top.yaml", "_base_: base.yaml\nlayers: [z]\ngroups: [{rank: 4}]\n")
    cfg = load_config("top.yaml")
    assert plain(cfg) == {"layers": ["z"], "groups": [{"rank": 4}]}


def test_delete_replaces_inherited_mapping(write):
    write("base.yaml", """
        optimizer: {_target_: torch.optim.AdamW, weight_decay: 1e-3, betas: [0.9, 0.99]}
        keep: {x: 1}
    """)
    write("top.yaml", """
        _base_: base.yaml
        optimizer:
          _delete_: true
          _target_: torch.optim.SGD
          momentum: 0.9
        keep: {y: 2, nested: {_delete_: false, z: 3}}
    """)
    cfg = load_config("top.yaml")
    assert plain(cfg["optimizer"]) == {"_target_": "torch.optim.SGD", "momentum": 0.9}
    assert plain(cfg["keep"]) == {"x": 1, "y": 2, "nested": {"z": 3}}


def test_chained_bases(write):
    write("cfgs/root.yaml", "a: 1\nb: 1\nc: 1\n")
    write("cfgs/mid.yaml", "_base_: root.yaml\nb: 2\nc: 2\n")
    write("cfgs/top.yaml", "_base_: mid.yaml\nc: 3\n")
    assert plain(load_config("cfgs/top.yaml")) == {"a": 1, "b": 2, "c": 3}


def test_base_tried_in_working_directory_first_then_next_to_file(write):
    write("cfgs/train/base.yaml", "who: cwd-relative\n")
    write("cfgs/train/examples/cfgs/train/base.yaml", "who: file-relative\n")
    write("cfgs/train/examples/local.yaml", "who: sibling\n")
    write("cfgs/train/examples/run.yaml", "_base_: cfgs/train/base.yaml\n")
    write("cfgs/train/examples/run2.yaml", "_base_: local.yaml\n")
    assert load_config("cfgs/train/examples/run.yaml").who == "cwd-relative"
    assert load_config("cfgs/train/examples/run2.yaml").who == "sibling"


def test_base_cycle_is_an_error_naming_the_chain(write):
    write("a.yaml", "_base_: b.yaml\nx: 1\n")
    write("b.yaml", "_base_: c.yaml\n")
    write("c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> c\.yaml -> a\.yaml"):
        load_config("a.yaml")


def test_missing_base_names_including_file_and_path(write):
    write("cfgs/top.yaml", "_base_: [cfgs/nothere.yaml]\n")
    with pytest.raises(ConfigError, match=r"cfgs/top\.yaml: `_base_` file 'cfgs/nothere\.yaml' not found"):
        load_config("cfgs/top.yaml")


def test_missing_top_file(workdir):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_yaml_parse_error_names_file_and_line(write):
    write("base.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    write("top.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml line \d+:"):
        load_config("top.yaml")


def test_duplicate_key_is_an_error(write):
    write("top.yaml", "a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match=r"top\.yaml line 3: duplicate key 'a'"):
        load_config("top.yaml")


def test_scientific_floats_and_dates_in_files(write):
    write("top.yaml", "lr: 2e-5\nwd: 1e-3\nbig: 1E4\nname: 1e-3x\nday: 2024-01-01\nint: 12\n")
    cfg = load_config("top.yaml")
    assert cfg.lr == pytest.approx(2e-5) and isinstance(cfg.lr, float)
    assert cfg.wd == pytest.approx(1e-3) and cfg.big == 1e4 and isinstance(cfg.big, float)
    assert cfg.name == "1e-3x" and cfg.day == "2024-01-01" and cfg.int == 12


def test_interpolation_in_base_sees_override_from_command_line(write):
    write("cfgs/base.yaml", """
        unet_lr: 1e-4
        lora_unet:
          - lr: ${unet_lr}
            layers: ['re:.*attn.?$']
    """)
    write("cfgs/run.yaml", "_base_: cfgs/base.yaml\ntrain: {lr: '${unet_lr}'}\n")
    cfg = load_config("cfgs/run.yaml", ["unet_lr=2e-4"])
    assert cfg.lora_unet[0].lr == pytest.approx(2e-4)
    assert cfg.train.lr == pytest.approx(2e-4)
    # the result is fully resolved: no interpolation survives
    assert "${" not in OmegaConf.to_yaml(cfg)


def test_interpolation_to_missing_key_names_key_and_file(write):
    write("cfgs/base.yaml", "train: {lr: '${unet_lr}'}\n")
    write("cfgs/run.yaml", "_base_: cfgs/base.yaml\n")
    with pytest.raises(ConfigError, match=r"`train\.lr` \(in cfgs/base\.yaml\): .*'unet_lr' not found"):
        load_config("cfgs/run.yaml")


def test_mandatory_missing_value_is_an_error(write):
    write("top.yaml", "model:\n  path: ???\n")
    with pytest.raises(ConfigError, match=r"`model\.path` .*model\.path=VALUE"):
        load_config("top.yaml")
    assert load_config("top.yaml", ["model.path=x"]).model.path == "x"
