"""Turn prompts into text-encoder embeddings, in 77-token chunks exactly as diffusers' pipelines do."""
from __future__ import annotations

import torch

from hcpdiff.models.embeddings import expand_placeholders


class PromptEncoder:
    """Tokenize prompts into `repeats` chunks of [bos] + 75 tokens + [eos] + padding, and encode them with CLIP."""

    def __init__(self, tokenizer, text_encoder, tokenizer_repeats: int = 1, clip_skip: int = 0) -> None:
        """`clip_skip=k` takes the output of the k-th layer from the end (0: the last), then the final layer norm."""
        if tokenizer_repeats < 1:
            raise ValueError(f"tokenizer_repeats must be >= 1, got {tokenizer_repeats}")
        if clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.repeats = tokenizer_repeats
        self.clip_skip = clip_skip
        self.chunk_len = tokenizer.model_max_length  # 77 for CLIP
        self.content_len = self.chunk_len - 2  # room left by bos and eos

    def tokenize(self, prompts: list[str]) -> torch.LongTensor:
        """Token ids [B, 77 * repeats]; content past 75 * repeats tokens is cut off."""
        content_ids = self.tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids
        content_ids = [expand_placeholders(self.tokenizer, ids)[0] for ids in content_ids]  # multi-vector embeddings
        rows = [self.chunked(ids[: self.content_len * self.repeats]) for ids in content_ids]
        return torch.tensor(rows, dtype=torch.long)

    def chunked(self, content: list[int]) -> list[int]:
        """One prompt's content ids laid out as `repeats` padded chunks."""
        bos, eos, pad = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        row: list[int] = []
        for start in range(0, self.content_len * self.repeats, self.content_len):
            chunk = [bos, *content[start : start + self.content_len], eos]
            row += chunk + [pad] * (self.chunk_len - len(chunk))
        return row

    def encode(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embeddings [B, 77 * repeats, D]: each chunk encoded on its own, then joined along the sequence."""
        batch_size = input_ids.shape[0]
        # The forward goes through a DDP wrapper when there is one (so gradients sync); attributes live on the model.
        model = getattr(self.text_encoder, "module", self.text_encoder)
        chunks = input_ids.reshape(batch_size * self.repeats, self.chunk_len).to(model.device)
        if self.clip_skip == 0:
            embeds = self.text_encoder(chunks)[0]
        else:
            hidden_states = self.text_encoder(chunks, output_hidden_states=True).hidden_states
            # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x still nests it
            transformer = getattr(model, "text_model", model)
            embeds = transformer.final_layer_norm(hidden_states[-(self.clip_skip + 1)])
        return embeds.reshape(batch_size, self.repeats * self.chunk_len, embeds.shape[-1])
