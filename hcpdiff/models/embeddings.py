"""Prompt embeddings (textual inversion): files, placeholder tokens, and the token rows they occupy.

An embedding named `pt-cat1` with n vectors becomes n new tokens, `pt-cat1 pt-cat1_1 ... pt-cat1_{n-1}` (diffusers'
`load_textual_inversion` names them the same way), added to each tokenizer, with one new row per token in each text
encoder's token-embedding matrix. A prompt names only the first token; `expand_placeholders` writes the rest after it,
so a weight on `{pt-cat1:1.2}` covers every vector.

Files are safetensors. hcpdiff's own holds one tensor [n_vectors, width] per text encoder, keyed by the part name
(`text_encoder`, and `text_encoder_2` for SDXL). a1111 / ComfyUI files (`emb_params` for SD1.x / 2.x, `clip_l` and
`clip_g` for SDXL, or a flattened `string_to_param.*`) are read the same way, so either kind works in `emb_dir`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hcpdiff.errors import ConfigError, ModelError

FORMAT = "hcpdiff-embedding"
FORMAT_VERSION = "1"
DEFAULT_EMB_DIR = "embs/"
# webui key -> hcpdiff part: SD1.x / 2.x a1111 files hold `emb_params`, SDXL ones `clip_l` (encoder 1) and `clip_g`
WEBUI_SD_KEY = "emb_params"
WEBUI_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# v1's `{name:1.2}` weight syntax around one word shaped like an embedding or checkpoint name (`pt-cat1`,
# `surtr_arknights-1000`): a hyphen and a final digit. Such a word that is no file in emb_dir is reported, not
# silently read as text.
CURLY_NAME_RE = re.compile(r"\{\s*([\w.]+-[\w.-]*\d)\s*(?::\s*[+-]?[.\d]+\s*)?\}")


def embedding_path(emb_dir: str | Path, name: str) -> Path:
    """Where the embedding `name` lives in `emb_dir`."""
    return Path(emb_dir) / f"{name}.safetensors"


def available_names(emb_dir: str | Path) -> list[str]:
    """Names of the embedding files in `emb_dir` (none when it does not exist)."""
    folder = Path(emb_dir)
    return sorted(path.stem for path in folder.glob("*.safetensors")) if folder.is_dir() else []


def missing_embedding_error(name: str, emb_dir: str | Path, where: str) -> ConfigError:
    """One line naming the missing embedding, the folder searched and what is there."""
    names = available_names(emb_dir)
    there = f"it holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else "it holds none"
    return ConfigError(f"{where}: embedding '{name}' not found: no {embedding_path(emb_dir, name)} ({there}); "
                       "create it with python -m hcpdiff.tools.create_embedding or set emb_dir")


def write_embedding(path: str | Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Save {part: [n_vectors, width]} with hcpdiff's metadata, through a temporary name (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {part: vectors[part].detach().float().cpu().contiguous() for part in vectors}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "n_vectors": str(next(iter(tensors.values())).shape[0]), **{k: str(v) for k, v in metadata.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_embedding(path: str | Path, text_encoders: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{part: [n_vectors, width]} for each of the model's text encoders, from an hcpdiff or a1111 / ComfyUI file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ModelError(f"embedding file '{path}' cannot be read as safetensors: {err}") from err
    if all(part in tensors for part in text_encoders):
        vectors = {part: tensors[part] for part in text_encoders}
    elif set(WEBUI_SDXL_KEYS) <= set(tensors):
        vectors = {part: tensors[key] for key, part in WEBUI_SDXL_KEYS.items() if part in text_encoders}
    else:
        webui = [key for key in tensors if key == WEBUI_SD_KEY or key.startswith("string_to_param")]
        vectors = {text_encoders[0]: tensors[webui[0]]} if len(webui) == 1 and len(text_encoders) == 1 else {}
    if set(vectors) != set(text_encoders):
        raise ModelError(f"embedding file '{path}' holds {sorted(tensors)}; a model with {', '.join(text_encoders)} "
                         "needs one tensor for each (hcpdiff's part names, emb_params for SD, clip_l and clip_g for "
                         "SDXL)")
    vectors = {part: tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() != 2 else tensor
               for part, tensor in vectors.items()}
    lengths = {tensor.shape[0] for tensor in vectors.values()}
    if len(lengths) != 1:
        raise ModelError(f"embedding file '{path}': its tensors have different numbers of vectors "
                         f"({ {part: tuple(t.shape) for part, t in vectors.items()} })")
    return vectors


def to_webui(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hcpdiff parts -> a1111 / ComfyUI keys: `emb_params` (one encoder) or `clip_l` / `clip_g` (SDXL)."""
    if set(vectors) == {"text_encoder"}:
        return {WEBUI_SD_KEY: vectors["text_encoder"]}
    if set(vectors) == set(WEBUI_SDXL_KEYS.values()):
        return {key: vectors[part] for key, part in WEBUI_SDXL_KEYS.items()}
    raise ModelError(f"an embedding of {sorted(vectors)} has no a1111 / ComfyUI layout (SD: text_encoder; SDXL: "
                     "text_encoder and text_encoder_2)")


def placeholder_tokens(name: str, n_vectors: int) -> list[str]:
    """The tokens an embedding occupies: its name, then `name_1` ... `name_{n-1}` (diffusers' convention)."""
    return [name] + [f"{name}_{i}" for i in range(1, n_vectors)]


def add_placeholder_tokens(tokenizer, text_encoder: torch.nn.Module, name: str, n_vectors: int) -> list[int]:
    """Add an embedding's tokens to the tokenizer and rows for them to the encoder's matrix; returns their ids.
    The name must be new to the tokenizer (a word it already knows would change meaning), unless it was added before
    (then its rows are reused)."""
    tokens = placeholder_tokens(name, n_vectors)
    added = tokenizer.get_added_vocab()
    if name not in added and name in tokenizer.get_vocab():
        raise ConfigError(f"embedding '{name}': the tokenizer already has this word; rename the embedding")
    if name in added and any(token not in added for token in tokens):
        raise ConfigError(f"embedding '{name}' is loaded twice with different numbers of vectors")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return list(ids)


def set_token_rows(text_encoder: torch.nn.Module, ids: list[int], vectors: torch.Tensor) -> None:
    """Write `vectors` [n, width] into the encoder's token-embedding rows `ids`."""
    weight = text_encoder.get_input_embeddings().weight
    if vectors.shape != (len(ids), weight.shape[1]):
        raise ModelError(f"embedding of shape {tuple(vectors.shape)} does not fit a text encoder of width "
                         f"{weight.shape[1]} ({len(ids)} vectors expected)")
    with torch.no_grad():
        weight[torch.tensor(ids)] = vectors.to(weight.device, weight.dtype)


def load_embedding_into(tokenizers: list, text_encoders: list[torch.nn.Module], parts: tuple[str, ...], name: str,
                        vectors: dict[str, torch.Tensor]) -> None:
    """Register one embedding (read_embedding's vectors) in every tokenizer / text encoder pair."""
    for tokenizer, encoder, part in zip(tokenizers, text_encoders, parts):
        ids = add_placeholder_tokens(tokenizer, encoder, name, vectors[part].shape[0])
        set_token_rows(encoder, ids, vectors[part])


def expansion_map(tokenizer) -> dict[int, list[int]]:
    """{first token id of a multi-vector embedding: all its ids}, read from the tokenizer's added tokens."""
    added = tokenizer.get_added_vocab()
    expansions: dict[int, list[int]] = {}
    for token, token_id in added.items():
        following = []
        while f"{token}_{len(following) + 1}" in added:
            following.append(added[f"{token}_{len(following) + 1}"])
        if following:
            expansions[token_id] = [token_id, *following]
    return expansions


def expand_placeholders(tokenizer, ids: list[int], weights: list[float] | None = None
                        ) -> tuple[list[int], list[float] | None]:
    """Token ids with each embedding's first token followed by its other tokens (weights repeated alike)."""
    expansions = expansion_map(tokenizer)
    if not expansions:
        return ids, weights
    out_ids: list[int] = []
    out_weights: list[float] = []
    for i, token_id in enumerate(ids):
        group = expansions.get(token_id, [token_id])
        out_ids += group
        if weights is not None:
            out_weights += [weights[i]] * len(group)
    return out_ids, (out_weights if weights is not None else None)


def prompt_embedding_names(prompts: list[str], emb_dir: str | Path, where: str = "prompt") -> list[str]:
    """The embeddings in `emb_dir` the prompts name (as whole words); a `{name:1.2}` word shaped like an embedding
    name (CURLY_NAME_RE) that is no file there is one ConfigError naming it."""
    names = available_names(emb_dir)
    used = [name for name in names
            if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", prompt) for prompt in prompts)]
    for prompt in prompts:
        for match in CURLY_NAME_RE.finditer(prompt):
            if match.group(1) not in names:
                raise missing_embedding_error(match.group(1), emb_dir, where)
    return used


def load_prompt_embeddings(components: dict, tokenizer_parts: tuple[str, ...], text_encoder_parts: tuple[str, ...],
                           emb_dir: str | Path, prompts: list[str], where: str = "prompt") -> list[str]:
    """Register every embedding of `emb_dir` the prompts name in the model's tokenizers and text encoders (modules in
    `components`, a pipeline's or the loaded parts'); returns their names."""
    names = prompt_embedding_names(prompts, emb_dir, where)
    for name in names:
        vectors = read_embedding(embedding_path(emb_dir, name), text_encoder_parts)
        load_embedding_into([components[part] for part in tokenizer_parts],
                            [components[part] for part in text_encoder_parts], text_encoder_parts, name, vectors)
    return names
