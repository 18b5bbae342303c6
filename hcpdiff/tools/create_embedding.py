"""Create a prompt embedding (textual inversion) to train: `python -m hcpdiff.tools.create_embedding --model M
--name pt-cat1 --n_vectors 4 --init_text "cat"` writes `embs/pt-cat1.safetensors`.

Each vector starts as the token embedding of the init text (its tokens repeated, or cut, to n_vectors); without an
init text, as random vectors of the embedding matrix's spread. SDXL files hold one tensor per text encoder.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from hcpdiff.cli import run_cli
from hcpdiff.errors import ConfigError
from hcpdiff.models.embeddings import DEFAULT_EMB_DIR, embedding_path, write_embedding


def init_vectors(tokenizer, text_encoder: torch.nn.Module, n_vectors: int, init_text: str | None,
                 generator: torch.Generator) -> torch.Tensor:
    """[n_vectors, width]: the init text's token rows, cycled to n_vectors; random (matrix std) without text."""
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    if not init_text:
        return torch.randn(n_vectors, weight.shape[1], generator=generator) * weight.std()
    ids = tokenizer(init_text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    if not ids:
        raise ConfigError(f"--init_text: '{init_text}' has no tokens")
    return weight[torch.tensor([ids[i % len(ids)] for i in range(n_vectors)])].clone()


def text_parts(model: str) -> tuple[Any, dict]:
    """(family, {part: module}) of a model: for a local folder only its tokenizers and text encoders load."""
    from hcpdiff.models.loading import check_model_folder, load_model_parts, transformers_progress_off

    local = Path(os.path.expanduser(model))
    if local.is_dir():
        family = check_model_folder(local, "--model", model)
        loaders = family.part_loaders(str(local), {"revision": None, "local_files_only": True})
        wanted = (*family.tokenizers, *family.text_encoders)
        with transformers_progress_off():
            return family, {part: loaders[part]() for part in wanted}
    parts = load_model_parts(model, where="--model")
    return parts.family, parts.components


def create_embedding(model: str, name: str, n_vectors: int, init_text: str | None, emb_dir: str,
                     seed: int = 0, overwrite: bool = False) -> Path:
    """Write `emb_dir/name.safetensors` for the model's text encoders; returns its path."""
    if n_vectors < 1:
        raise ConfigError(f"--n_vectors must be >= 1, got {n_vectors}")
    path = embedding_path(emb_dir, name)
    if path.exists() and not overwrite:
        raise ConfigError(f"--name: '{path}' already exists; pick another name or pass --overwrite")
    family, components = text_parts(model)
    generator = torch.Generator().manual_seed(seed)
    vectors = {part: init_vectors(components[tok], components[part], n_vectors, init_text, generator)
               for part, tok in zip(family.text_encoders, family.tokenizers)}
    return write_embedding(path, vectors, {"name": name, "base_model": model, "init_text": init_text or ""})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.create_embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    parser.add_argument("--name", required=True, help="the embedding's name, used in prompts (pt-cat1)")
    parser.add_argument("--n_vectors", type=int, default=1, help="tokens the embedding takes in a prompt")
    parser.add_argument("--init_text", default=None, help="initial value: this text's token embeddings")
    parser.add_argument("--emb_dir", default=DEFAULT_EMB_DIR, help="folder of embeddings (default embs/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random vectors (without --init_text)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    args = parser.parse_args(argv)
    path = create_embedding(args.model, args.name, args.n_vectors, args.init_text, args.emb_dir, args.seed,
                            args.overwrite)
    print(f"wrote {path} ({args.n_vectors} vectors)")
    return 0


if __name__ == "__main__":
    run_cli(main)
