"""PromptEncoder: token ids and embeddings identical to diffusers' pipeline, plus longer prompts in chunks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcpdiff.models import PromptEncoder, load_model_parts

PROMPTS = ["a photo of a cat", "", "word " * 120]


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path):
    """The tiny model's parts (read only here)."""
    return load_model_parts(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pipeline(parts):
    """A diffusers pipeline over the same parts, as the reference."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_ids_equal_the_tokenizer_with_max_length_padding(parts) -> None:
    ids = PromptEncoder(parts.tokenizer, parts.text_encoder).tokenize(PROMPTS)
    expected = parts.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == torch.long
    assert ids.tolist() == expected


@torch.no_grad()
def test_embeddings_equal_the_pipeline(parts, pipeline) -> None:
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    expected, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(encoder.encode(encoder.tokenize(PROMPTS)), expected)


@torch.no_grad()
def test_clip_skip_is_the_earlier_layer_then_final_norm(parts) -> None:
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, clip_skip=1)
    ids = encoder.tokenize(PROMPTS)
    hidden = parts.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    final_norm = getattr(parts.text_encoder, "text_model", parts.text_encoder).final_layer_norm
    assert torch.equal(encoder.encode(ids), final_norm(hidden))
    assert not torch.equal(encoder.encode(ids), PromptEncoder(parts.tokenizer, parts.text_encoder).encode(ids))


@torch.no_grad()
def test_clip_skip_equals_the_pipeline(parts, pipeline) -> None:
    text_encoder = pipeline.text_encoder
    if not hasattr(text_encoder, "text_model"):
        # diffusers' clip_skip path reads `text_encoder.text_model.final_layer_norm`, which transformers 5 moved up
        # one level; expose it under the old name (not as a submodule) so diffusers' own code runs unchanged.
        object.__setattr__(text_encoder, "text_model", text_encoder)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, clip_skip=1)
    expected, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)
    assert torch.equal(encoder.encode(encoder.tokenize(PROMPTS)), expected)


def test_repeats_give_fixed_chunks_of_77(parts) -> None:
    tokenizer = parts.tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    encoder = PromptEncoder(tokenizer, parts.text_encoder, tokenizer_repeats=3)
    ids = encoder.tokenize(["a cat", "word " * 300])
    assert ids.shape == (2, 231)
    short, long = ids.reshape(2, 3, 77)
    assert short[0, :2].tolist() == [bos] + tokenizer("a cat", add_special_tokens=False).input_ids[:1]
    assert short[1].tolist() == [bos, eos] + [pad] * 75  # an empty chunk still comes, so batches stack
    content = tokenizer("word " * 300, add_special_tokens=False).input_ids
    assert long[1].tolist() == [bos, *content[75:150], eos]
    assert long[2].tolist() == [bos, *content[150:225], eos]  # the rest is cut off


@torch.no_grad()
def test_repeats_encode_each_chunk_alone(parts) -> None:
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, tokenizer_repeats=2)
    ids = encoder.tokenize(["word " * 100])
    embeds = encoder.encode(ids)
    assert embeds.shape == (1, 154, 32)
    second_chunk = parts.text_encoder(ids[:, 77:])[0]
    assert torch.equal(embeds[:, 77:], second_chunk)
