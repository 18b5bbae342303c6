"""HCP-Diffusion v1 spellings translated key by key; today's shipped configs are never taken for v1 ones."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hcpdiff.config import load_config
from hcpdiff.config.v1_compat import is_v1_infer, is_v1_train
from hcpdiff.config.v1_infer import translate_infer
from hcpdiff.config.v1_train import translate_train
from hcpdiff.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_are_not_v1():
    for file in sorted((REPO / "cfgs/train").rglob("*.yaml")):
        assert not is_v1_train(OmegaConf.to_container(load_config(file), resolve=True)), file
    for file in sorted((REPO / "cfgs/infer").rglob("*.yaml")):
        assert not is_v1_infer(OmegaConf.to_container(load_config(file), resolve=True)), file


def test_lora_groups_get_v1_defaults_and_scale():
    tree = {"logger": [], "lora_unet": [{"layers": ["x"]}, {"lr": 1e-4, "rank": 8, "alpha": 4,
                                                            "alpha_auto_scale": False, "layers": ["y"]}]}
    groups = translate_train(tree).tree["lora_unet"]
    assert groups[0] == {"layers": ["x"], "lr": 1e-5, "rank": 1, "alpha": 1.0}
    assert groups[1]["alpha"] == 32.0 and "alpha_auto_scale" not in groups[1]  # v1 scale 4 = 32 / 8


def test_sdxl_text_encoder_groups_split_by_v1s_clip_prefixes():
    """v1 named SDXL's encoders clip_B. (CLIP-L) and clip_bigG. inside one module; today they are two parts."""
    tree = {"lora_text_encoder": [{"lr": 1e-5, "rank": 4, "layers": [r"re:clip_B\.text_model.*self_attn$",
                                                                  "clip_bigG.text_model.encoder.layers.0.mlp.fc1",
                                                                  r"re:clip_bigG\..*mlp\.fc2$"]}]}
    out = translate_train(tree)
    assert out.tree["lora_text_encoder"] == [{"lr": 1e-5, "rank": 4, "alpha": 1.0,
                                              "layers": ["re:text_model.*self_attn$"]}]
    assert out.tree["lora_text_encoder_2"] == [{"lr": 1e-5, "rank": 4, "alpha": 1.0, "layers": [
        "text_model.encoder.layers.0.mlp.fc1", r"re:.*mlp\.fc2$"]}]
    plain = translate_train({"lora_text_encoder": [{"layers": ["re:.*self_attn$"]}]}).tree  # SD: unchanged
    assert "lora_text_encoder_2" not in plain and plain["lora_text_encoder"][0]["layers"] == ["re:.*self_attn$"]


def test_loss_ema_loggers_buckets_and_deleted_keys():
    tree = {"model": {"ema": {"_target_": "hcpdiff.utils.ema.ModelEMA", "_partial_": True, "decay_max": 0.99}},
            "train": {"loss": {"criterion": {"_target_": "hcpdiff.loss.MinSNRLoss", "gamma": 2.0}},
                      "optimizer": {"_target_": "torch.optim.AdamW", "type": "---"}},
            "logger": [{"_target_": "hcpdiff.loggers.TBLogger", "log_step": 5},
                       {"_target_": "hcpdiff.loggers.WanDBLogger", "log_step": 7}],
            "data": {"d": {"source": {"s": {"img_root": "i", "caption_file": {  # `_targe_`: v1's own DreamArtist++ typo
                "_targe_": "hcpdiff.data.JsonCaptionLoader", "path": "c.json"}}},
                           "bucket": {"_target_": "hcpdiff.data.bucket.SizeBucket.from_files", "num_bucket": 1,
                                      "target_area": "---"}}}}
    out = translate_train(tree).tree
    assert out["model"]["ema"] == {"decay": 0.99}
    assert out["train"]["loss"] == {"min_snr_gamma": 2.0} and "type" not in out["train"]["optimizer"]
    assert out["train"]["log_with"] == ["tensorboard", "wandb"] and out["train"]["log_step"] == 5
    assert out["data"]["d"]["source"]["s"]["caption_file"] == "c.json"
    assert out["data"]["d"]["bucket"]["_target_"] == "hcpdiff.data.MaxPixelsBucket"


def test_refusals_are_one_error_naming_each_key():
    tree = {"tokenizer_pt": {"train": [{"name": "a", "lr": 1e-3}]},
            "lora_unet": [{"lr": 1, "rank": 2, "branch": "p", "layers": ["x"]}],
            "train": {"loss": {"criterion": {"_target_": "hcpdiff.loss.EDMLoss"}}}}
    with pytest.raises(ConfigError) as err:
        translate_train(tree).raise_refused("old.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("old.yaml is an HCP-Diffusion v1 config")
    assert "`tokenizer_pt.train`" in message and "`lora_unet[0].branch`" in message
    assert "`train.loss.criterion: hcpdiff.loss.EDMLoss`" in message


def test_tokenizer_pt_becomes_embeddings_where_the_build_has_them():
    tree = {"tokenizer_pt": {"emb_dir": "e/", "train": [{"name": "a", "lr": 1e-3}]}}
    out = translate_train(tree, known_top_level={"embeddings"})
    assert out.tree["embeddings"] == {"emb_dir": "e/", "train": [{"name": "a", "lr": 1e-3}]} and not out.refused


def test_infer_condition_interface_and_variables():
    tree = {"seed": None, "condition": {"type": "inpaint", "image": "a.png", "mask": "m.png"}, "out": "o/",
            "interface": [{"_target_": "hcpdiff.vis.DiskInterface", "save_root": "o/", "image_type": "webp"}],
            "merge": {"alpha": 0.5, "g": {"type": "TE", "lora": [{"path": "p", "alpha": 0.5}], "part": None}}}
    out = translate_infer(tree, variables={"out", "merge.alpha"}).tree
    assert out["seed"] == 42 and out["init_image"] == "a.png" and out["mask_image"] == "m.png"
    assert out["save"] == {"out_dir": "o/", "image_type": "webp"} and "out" not in out
    assert out["merge"] == {"g": {"type": "TE", "lora": [{"path": "p", "alpha": 0.5}]}}
