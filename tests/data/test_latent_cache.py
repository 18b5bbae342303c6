"""Latent and text-embedding caches: keys, reuse across runs, no decoding in cached epochs, flips, refusals."""

from __future__ import annotations

import logging
import os

import pytest
import PIL.Image
import torch

from hcpdiff.data import ImageCaptionDataset, build_dataset
from hcpdiff.data.images import load_for_bucket, to_tensor
from hcpdiff.data.latent_cache import CachedLatentDataset, LatentEncoder, LatentStore, fill_latent_cache
from hcpdiff.errors import ConfigError
from hcpdiff.data.tensor_store import TensorStore, weights_identity
from hcpdiff.train.text_cache import CachedConditioner

from data_helpers import write_image

KEY = "data.dataset1"
FIXED_64 = {"_target_": "hcpdiff.data.FixedBucket", "target_size": 64}


class FakeVae:
    """encode_dist stand-in: mean = 8x8 average of the pixels [B, 3, H/8, W/8], std = `std`; counts images."""

    def __init__(self, std: float = 0.1) -> None:
        self.std = std
        self.images = 0

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.images += pixel_values.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixel_values, 8)
        return mean, torch.full_like(mean, self.std)


def encoder(vae: FakeVae, identity: str = "fake-vae") -> LatentEncoder:
    return LatentEncoder(vae, identity, batch_size=2)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    write_image(images / "a.png", (96, 64), seed=1)
    write_image(images / "b.png", (64, 96), seed=2)
    write_image(images / "c.png", (80, 80), seed=3)
    return images


def node(folder, bucket=FIXED_64, cache_dir=None, **source_fields) -> dict:
    return {"batch_size": 2, "cache_latents": True, "cache_dir": None if cache_dir is None else str(cache_dir),
            "source": {"s": {"img_root": str(folder), **source_fields}}, "bucket": bucket}


def build(dataset_node, vae: FakeVae, **kwargs):
    return build_dataset(dataset_node, KEY, pixel_step=16, seed=0, latent_encoder=encoder(vae), show_progress=False,
                         **kwargs)


def test_memory_cache_serves_latents_and_decodes_nothing_in_epochs(folder, monkeypatch):
    vae = FakeVae()
    built = build(node(folder), vae)
    assert isinstance(built.dataset, CachedLatentDataset) and vae.images == 3
    decoded = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: decoded.append(a) or real_open(*a, **k))
    for epoch in range(2):
        for index in range(len(built.dataset)):
            sample = built.dataset[(index, epoch)]
            assert sample["latents"].shape == (3, 8, 8) and "pixel_values" not in sample
            assert sample["original_size"] == tuple(built.dataset.geometry[index][0])
    assert decoded == [] and vae.images == 3


def test_latents_are_sampled_per_draw_around_the_stored_mean(folder):
    vae = FakeVae(std=0.5)
    cached = build(node(folder), vae).dataset
    plain = cached.dataset
    mean = torch.nn.functional.avg_pool2d(plain[0]["pixel_values"][None], 8)[0]
    first, again, other = cached[(0, 0)]["latents"], cached[(0, 0)]["latents"], cached[(0, 1)]["latents"]
    assert torch.equal(first, again) and not torch.equal(first, other)  # reproducible per (index, epoch)
    draws = torch.stack([cached[(0, epoch)]["latents"] for epoch in range(200)])
    assert torch.allclose(draws.mean(0), mean, atol=0.15) and 0.4 < float(draws.std(0).mean()) < 0.6
    assert cached[(1, 3)]["prompt"] == plain.sample_prompt(1, 3)


def test_disk_cache_is_reused_by_a_second_run(folder, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    build(node(folder, cache_dir=cache_dir), FakeVae())
    assert len(list(cache_dir.iterdir())) == 3
    second = FakeVae()
    with caplog.at_level(logging.INFO):
        built = build(node(folder, cache_dir=cache_dir), second)
    assert second.images == 0 and "0 encoded, 3 reused" in caplog.text
    assert built.dataset[(2, 0)]["latents"].shape == (3, 8, 8)


def test_changed_file_or_bucket_is_encoded_again(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    build(node(folder, cache_dir=cache_dir), FakeVae())
    stat = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: new mtime
    write_image(folder / "b.png", (64, 96), seed=9)  # rewritten
    again = FakeVae()
    build(node(folder, cache_dir=cache_dir), again)
    assert again.images == 2
    bigger = FakeVae()
    built = build(node(folder, cache_dir=cache_dir, bucket={**FIXED_64, "target_size": 96}), bigger)
    assert bigger.images == 3 and built.dataset[(0, 0)]["latents"].shape == (3, 12, 12)


def test_stale_or_foreign_entry_is_never_used(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    built = build(node(folder, cache_dir=cache_dir), FakeVae())
    store = LatentStore(cache_dir)
    key = built.dataset.keys[0][0]
    # A file under the right name holding another key's entry (as a hash clash or a copied file would).
    store.file_of(key).unlink()
    store.put(key.replace("fake-vae", "other-vae"), torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    store.file_of(key.replace("fake-vae", "other-vae")).rename(store.file_of(key))
    assert key not in store
    again = FakeVae()
    build(node(folder, cache_dir=cache_dir), again)
    assert again.images == 1
    other_vae = FakeVae()
    build_dataset(node(folder, cache_dir=cache_dir), KEY, pixel_step=16, seed=0,
                  latent_encoder=encoder(other_vae, "another-vae"), show_progress=False)
    assert other_vae.images == 3


def test_random_flip_caches_both_orientations(folder):
    vae = FakeVae(std=0.0)
    cached = build(node(folder, random_flip=True), vae).dataset
    assert vae.images == 6
    plain: ImageCaptionDataset = cached.dataset
    seen_flips = set()
    for epoch in range(8):
        pixels = plain[0]["pixel_values"]  # the epoch-th fetch of item 0: draw `epoch`
        expected = torch.nn.functional.avg_pool2d(pixels[None], 8)[0]
        assert torch.allclose(cached[(0, epoch)]["latents"], expected, atol=1e-6)
        image = load_for_bucket(plain.items[0].path, (64, 64))[0]
        seen_flips.add(not torch.equal(pixels, to_tensor(image)))
    assert seen_flips == {True, False}


def test_random_crop_turns_the_cache_off_with_one_warning(folder, caplog):
    vae = FakeVae()
    with caplog.at_level(logging.WARNING):
        built = build(node(folder, crop="random"), vae)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.dataset1.cache_latents" in warnings[0] and "crop is random" in warnings[0]
    assert isinstance(built.dataset, ImageCaptionDataset) and vae.images == 0
    assert "pixel_values" in built.dataset[0]


def test_broken_image_uses_another_of_its_bucket(folder):
    # a file cut short after the scan (the scan itself skips truncated files): header ok, pixels cut
    (folder / "d.png").write_bytes((folder / "c.png").read_bytes())
    dataset = build_dataset(node(folder), KEY, pixel_step=16, seed=0).dataset
    (folder / "d.png").write_bytes((folder / "c.png").read_bytes()[:200])
    vae = FakeVae()
    cached, report = fill_latent_cache(dataset, encoder(vae), show_progress=False)
    assert report.substituted == 1 and cached[(3, 0)]["latents"].shape == (3, 8, 8)


def test_text_cache_auto_true_false(folder, tmp_path):
    fixed = {**node(folder), "cache_latents": False}
    assert build_dataset(fixed, KEY, pixel_step=16, seed=0).text_cache_prompts is not None
    shuffled = {**fixed, "source": {"s": {"img_root": str(folder), "tag_shuffle": True}}}
    assert build_dataset(shuffled, KEY, pixel_step=16, seed=0).text_cache_prompts is None
    with pytest.raises(ConfigError, match="cache_text_embeds is true but cannot be: .*tag_shuffle"):
        build_dataset({**shuffled, "cache_text_embeds": True}, KEY, pixel_step=16, seed=0)
    with pytest.raises(ConfigError, match="text-encoder LoRA"):
        build_dataset({**fixed, "cache_text_embeds": True}, KEY, pixel_step=16, seed=0, text_encoder_trained=True)
    templates = tmp_path / "templates.txt"
    templates.write_text("a {caption}\na photo of {caption}\n")
    several = {**fixed, "source": {"s": {"img_root": str(folder), "prompt_template": str(templates)}}}
    assert build_dataset(several, KEY, pixel_step=16, seed=0).text_cache_prompts is None
    assert build_dataset({**fixed, "cache_text_embeds": False}, KEY, pixel_step=16, seed=0).text_cache_prompts is None


def test_cached_conditioner_encodes_each_prompt_once(tmp_path):
    calls = []

    def conditioner(prompts, batch, device):
        calls.append(list(prompts))
        return {"encoder_hidden_states": torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])}

    cached = CachedConditioner(conditioner, identity="encoders-a")
    cached.add(["bb", "a"], TensorStore())
    report = cached.fill(torch.device("cpu"), batch_size=8)
    assert calls == [["a", "bb"]] and (report.encoded, report.reused) == (2, 0)  # sorted, one batch, before training
    first = cached(["a", "bb", "a"], {}, torch.device("cpu"))
    second = cached(["bb", "a"], {}, torch.device("cpu"))
    assert len(calls) == 1 and first["encoder_hidden_states"].shape == (3, 2, 3)
    assert torch.equal(second["encoder_hidden_states"], conditioner(["bb", "a"], {}, None)["encoder_hidden_states"])
    cached(["a", "unknown"], {}, torch.device("cpu"))  # not a cacheable prompt: passed through
    assert calls[-1] == ["a", "unknown"]
    cached.release_encoders()
    with pytest.raises(RuntimeError, match="'unknown' is not in the text cache"):
        cached(["unknown"], {}, torch.device("cpu"))
    assert torch.equal(cached(["a"], {}, torch.device("cpu"))["encoder_hidden_states"][0], torch.full((2, 3), 1.0))


def test_text_cache_on_disk_is_reused_by_the_same_encoders_only(tmp_path):
    calls = []

    def conditioner(prompts, batch, device):
        calls.append(list(prompts))
        return {"encoder_hidden_states": torch.randn(len(prompts), 4, 3), "pooled": torch.randn(len(prompts), 3)}

    def fill(identity: str) -> CachedConditioner:
        cached = CachedConditioner(conditioner, identity)
        cached.add(["a", "b", "c"], TensorStore(tmp_path / "text_embeds"))
        cached.report = cached.fill(torch.device("cpu"), batch_size=2)
        return cached

    first = fill("encoders-a")
    assert calls == [["a", "b"], ["c"]] and len(list((tmp_path / "text_embeds").glob("*.safetensors"))) == 3
    again = fill("encoders-a")
    assert len(calls) == 2 and (again.report.encoded, again.report.reused) == (0, 3)
    again.release_encoders()  # a second run needs no encoder: every row comes from the disk
    for prompt in "abc":
        ours, theirs = first([prompt], {}, torch.device("cpu")), again([prompt], {}, torch.device("cpu"))
        assert all(torch.equal(ours[name], theirs[name]) for name in ("encoder_hidden_states", "pooled"))
    other = fill("encoders-b")  # another model, precision or setting: encoded again
    assert other.report.encoded == 3 and len(calls) == 4


def test_weights_identity_sees_a_merged_layer_and_the_precision():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    base = weights_identity(model, "m")
    with torch.no_grad():
        model[2].weight += 0.01  # as a LoRA fused into the last layer
    assert weights_identity(model, "m") != base
    assert weights_identity(model.to(torch.bfloat16), "m").split("|")[1] == "bfloat16"
