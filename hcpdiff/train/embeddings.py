"""Training prompt embeddings (textual inversion; with LoRA groups, pivotal tuning).

`embeddings: {emb_dir, train: [{name, lr}]}` names embedding files (made by create_embedding) to train. Each becomes
placeholder tokens in every tokenizer and a trainable parameter [n_vectors, width] per text encoder, looked up in
place of those tokens' rows by `TrainableTokenRows`; the encoder's own matrix stays frozen, so nothing else in it
changes. Checkpoints `ckpts/<name>-<step>.safetensors` are in create_embedding's format, so they go straight into
an `emb_dir` (or a next run's `embeddings`). HCP-Diffusion v1's `tokenizer_pt:` is read as `embeddings:`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from hcpdiff.config import read_fields
from hcpdiff.errors import ConfigError
from hcpdiff.families import TRAINABLE_PARTS
from hcpdiff.lora.spec import GROUP_LR
from hcpdiff.models.embeddings import (DEFAULT_EMB_DIR, add_placeholder_tokens, embedding_path,
                                       missing_embedding_error, read_embedding, write_embedding)

logger = logging.getLogger("hcpdiff.train")
V1_KEY = "tokenizer_pt"


@dataclass
class EmbeddingTrainSpec:
    """One entry of `embeddings.train`."""

    name: str  # an embedding file in emb_dir (<name>.safetensors); prompts use the name
    lr: Annotated[float, GROUP_LR]  # learning rate of its optimizer param group


@dataclass
class EmbeddingsSpec:
    """The `embeddings:` section (v1: `tokenizer_pt:`)."""

    emb_dir: str = DEFAULT_EMB_DIR  # where the embeddings to train are read from
    train: list = field(default_factory=list)  # [{name, lr}]
    replace: bool = False  # v1's key, accepted when false (v1 configs carry `replace: False`)


def wants_embeddings(cfg: Any) -> bool:
    """Whether the config lists embeddings to train (in either spelling), before the section is read."""
    return lists_entries(cfg.get("embeddings")) or lists_entries(cfg.get(V1_KEY))


def lists_entries(node: Any) -> bool:
    """Whether an embeddings section (either spelling) lists any embedding to train."""
    return isinstance(node, Mapping) and bool(node.get("train"))


def read_embeddings_spec(cfg: Any) -> tuple[str, EmbeddingsSpec, list[EmbeddingTrainSpec]] | None:
    """(config key, section, entries) of `embeddings:` or v1's `tokenizer_pt:`; None when neither trains anything."""
    ours, v1 = cfg.get("embeddings"), cfg.get(V1_KEY)
    if ours and v1 and lists_entries(ours):  # train_base.yaml's empty `embeddings:` gives way to a v1 section
        raise ConfigError(f"embeddings and {V1_KEY}: both are set; {V1_KEY} is HCP-Diffusion v1's spelling of "
                          "embeddings, keep one")
    key, node = (V1_KEY, v1) if v1 else ("embeddings", ours)
    if not node:
        return None
    if key == V1_KEY:
        logger.info("%s: read as `embeddings:` (HCP-Diffusion v1's spelling)", V1_KEY)
    spec = read_fields(node, key, EmbeddingsSpec)
    if spec.replace:
        raise ConfigError(f"{key}.replace: true is not supported; an embedding's name must be a new word "
                          "(set it to false or remove it)")
    entries = [read_fields(item, f"{key}.train[{i}]", EmbeddingTrainSpec) for i, item in enumerate(spec.train or [])]
    names = [entry.name for entry in entries]
    for i, name in enumerate(names):
        if name in TRAINABLE_PARTS:  # ckpts/<name>-<step> would be that part's checkpoint
            raise ConfigError(f"{key}.train[{i}].name: '{name}' is a model part's name; rename the embedding")
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"{key}.train: embedding '{name}' is listed twice; list it once")
    for i, entry in enumerate(entries):  # before any model loads
        if not embedding_path(spec.emb_dir, entry.name).is_file():
            raise missing_embedding_error(entry.name, spec.emb_dir, f"{key}.train[{i}].name")
    return (key, spec, entries) if entries else None


class TrainableTokenRows(nn.Module):
    """A frozen token embedding whose rows for some token ids come from trainable vectors instead."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.vectors = nn.ParameterDict()
        # token id -> row of the concatenated vectors, -1 for the base model's tokens
        self.register_buffer("slot", torch.full((base.num_embeddings,), -1, dtype=torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The base matrix (code reading the input embeddings' dtype or width)."""
        return self.base.weight

    def add(self, name: str, ids: list[int], vectors: torch.Tensor) -> nn.Parameter:
        """Train `vectors` [n, width] in place of token ids `ids`; returns the new parameter."""
        start = sum(len(v) for v in self.vectors.values())
        self.slot[torch.tensor(ids)] = torch.arange(start, start + len(ids))
        key = str(len(self.vectors))  # a name may hold dots, which a ParameterDict key may not
        self.vectors[key] = nn.Parameter(vectors.float().to(self.base.weight.device).clone())
        return self.vectors[key]

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        slots = self.slot[input_ids]
        trained = torch.cat(list(self.vectors.values())).to(embeds.dtype)[slots.clamp(min=0)]
        return torch.where((slots >= 0)[..., None], trained, embeds)


@dataclass
class EmbeddingGroup:
    """One trained embedding: an optimizer param group with a vector parameter per text encoder."""

    name: str  # the param group's label: embeddings[<embedding name>]
    embedding: str
    lr: float
    layers: list[str]  # the text encoders it trains in
    vectors: dict[str, nn.Parameter] = field(repr=False)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.vectors.values())


def attach_embeddings(entries: list[EmbeddingTrainSpec], emb_dir: str, components: dict[str, Any],
                      tokenizer_parts: tuple[str, ...], encoder_parts: tuple[str, ...]) -> list[EmbeddingGroup]:
    """Add each embedding's tokens to every tokenizer and its vectors as trainable rows of every text encoder."""
    loaded = [read_embedding(embedding_path(emb_dir, entry.name), encoder_parts) for entry in entries]
    vectors: dict[str, dict[str, nn.Parameter]] = {entry.name: {} for entry in entries}
    for tokenizer_part, part in zip(tokenizer_parts, encoder_parts):
        tokenizer, encoder = components[tokenizer_part], components[part]
        # every token first: resizing replaces the encoder's embedding module, so it is wrapped once, after
        ids = [add_placeholder_tokens(tokenizer, encoder, entry.name, len(vecs[part]))
               for entry, vecs in zip(entries, loaded)]
        rows = TrainableTokenRows(encoder.get_input_embeddings())
        encoder.set_input_embeddings(rows)
        for entry, vecs, token_ids in zip(entries, loaded, ids):
            vectors[entry.name][part] = rows.add(entry.name, token_ids, vecs[part])
    return [EmbeddingGroup(f"embeddings[{entry.name}]", entry.name, entry.lr, list(encoder_parts), vectors[entry.name])
            for entry in entries]


def save_embedding_checkpoints(groups: list[EmbeddingGroup], ckpt_dir: Path, step: int,
                               metadata: dict[str, str]) -> list[Path]:
    """Write `ckpts/<name>-<step>.safetensors` per embedding, in create_embedding's format."""
    return [write_embedding(ckpt_dir / f"{group.embedding}-{step}.safetensors", dict(group.vectors),
                            {**metadata, "name": group.embedding, "step": str(step)})
            for group in groups]


def load_embedding_checkpoints(groups: list[EmbeddingGroup], ckpt_dir: Path, step: int) -> None:
    """Put the vectors of step `step`'s embedding checkpoints back (resume)."""
    for group in groups:
        saved = read_embedding(ckpt_dir / f"{group.embedding}-{step}.safetensors", tuple(group.vectors))
        with torch.no_grad():
            for part, param in group.vectors.items():
                param.copy_(saved[part])
