"""a1111-style prompt weights: `(text:1.2)`, `{text:1.2}`, bare `(text)` = 1.1; long prompts in 75-token chunks."""
from __future__ import annotations

import math
import re

import torch

from hcpdiff.models import PromptEncoder
from hcpdiff.models.embeddings import expand_placeholders
from hcpdiff.models.sdxl import encode_penultimate

BARE_WEIGHT = 1.1  # a1111's weight for `(text)` without a number
TOKEN_RE = re.compile(r"\\[(){}\\]|:\s*([+-]?[.\d]+)\s*[)}]|[({]|[)}]|[^\\(){}:]+|:|\\")


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) spans; nested brackets multiply, unclosed ones count as closed at the end."""
    spans: list[list] = []
    open_at: list[int] = []  # index into spans where each open bracket starts

    def scale(start: int, weight: float) -> None:
        for span in spans[start:]:
            span[1] *= weight

    for match in TOKEN_RE.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token in ("(", "{"):
            open_at.append(len(spans))
        elif number is not None and open_at:
            scale(open_at.pop(), float(number))
        elif token in (")", "}") and open_at:
            scale(open_at.pop(), BARE_WEIGHT)
        elif token.startswith("\\") and len(token) == 2:
            spans.append([token[1], 1.0])
        else:
            spans.append([token, 1.0])
    for start in open_at:
        scale(start, BARE_WEIGHT)
    merged: list[tuple[str, float]] = []
    for text, weight in spans:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def weighted_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Content token ids of a prompt (no bos/eos) and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_weights(prompt):
        span_ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += span_ids
        weights += [weight] * len(span_ids)
    ids, weights = expand_placeholders(tokenizer, ids, weights)  # an embedding's weight covers all its vectors
    return ids, weights


def chunks_needed(tokenizer, prompts: list[str]) -> int:
    """How many 75-token chunks the longest prompt needs (at least one)."""
    content_len = tokenizer.model_max_length - 2
    longest = max(len(weighted_tokens(tokenizer, prompt)[0]) for prompt in prompts)
    return max(1, math.ceil(longest / content_len))


def encode_weighted(
    tokenizer, text_encoder, prompts: list[str], repeats: int, clip_skip: int = 0
) -> torch.Tensor:
    """Embeddings [B, 77 * repeats, D]; weighted tokens are scaled, then each row is rescaled to its unweighted mean."""
    encoder = PromptEncoder(tokenizer, text_encoder, tokenizer_repeats=repeats, clip_skip=clip_skip)
    input_ids, weights = weighted_rows(encoder, prompts)
    with torch.no_grad():
        embeds = encoder.encode(input_ids)
    return apply_weights(embeds, weights)


def encode_weighted_sdxl(
    tokenizers: list, text_encoders: list, prompts: list[str], repeats: int, clip_skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (both encoders' penultimate states, each weighted as in encode_weighted, side by side; pooled text of
    encoder 2's first chunk, unweighted as in a1111), laid out as diffusers' SDXL encode_prompt lays them out."""
    hidden_states, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        encoder = PromptEncoder(tokenizer, text_encoder, tokenizer_repeats=repeats, clip_skip=clip_skip)
        input_ids, weights = weighted_rows(encoder, prompts)
        with torch.no_grad():
            hidden, pooled = encode_penultimate(encoder, input_ids)
        hidden_states.append(apply_weights(hidden, weights))
    return torch.cat(hidden_states, dim=-1), pooled


def weighted_rows(encoder: PromptEncoder, prompts: list[str]) -> tuple[torch.LongTensor, torch.Tensor]:
    """Token ids [B, 77 * repeats] (content past the last chunk is cut) and each position's weight (1 for
    bos, eos and padding)."""
    rows, weight_rows = [], []
    capacity = encoder.content_len * encoder.repeats
    for prompt in prompts:
        ids, weights = weighted_tokens(encoder.tokenizer, prompt)
        rows.append(encoder.chunked(ids[:capacity]))
        row_weights: list[float] = []
        for start in range(0, capacity, encoder.content_len):
            chunk = weights[start : start + encoder.content_len]
            row_weights += [1.0, *chunk] + [1.0] * (encoder.chunk_len - 1 - len(chunk))
        weight_rows.append(row_weights)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(weight_rows)


def apply_weights(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position by its weight, then rescale each row to its unweighted mean (all ones: unchanged)."""
    weights = weights.to(embeds.device, embeds.dtype)
    if bool((weights == 1).all()):
        return embeds
    original_mean = embeds.float().mean(dim=(1, 2), keepdim=True)
    weighted = embeds.float() * weights[..., None]
    weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.to(embeds.dtype)
