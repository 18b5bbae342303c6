"""Prompt embeddings: create_embedding's files, placeholder tokens and weights, webui keys, missing names."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from hcpdiff.errors import ConfigError
from hcpdiff.infer.prompt_weights import weighted_tokens
from hcpdiff.models import PromptEncoder
from hcpdiff.models.embeddings import (load_embedding_into, prompt_embedding_names, read_embedding, to_webui,
                                       write_embedding)
from hcpdiff.train.embeddings import TrainableTokenRows


def test_create_embedding_writes_init_text_rows_per_encoder(cli_in_process, workdir, tiny_model, tiny_sdxl):
    for model, parts in ((tiny_model, ("text_encoder",)), (tiny_sdxl, ("text_encoder", "text_encoder_2"))):
        result = cli_in_process(["-m", "hcpdiff.tools.create_embedding", "--model", str(model), "--name", "pt-cat1",
                                 "--n_vectors", "4", "--init_text", "cat", "--emb_dir", f"embs_{model.name}"],
                                cwd=workdir)
        assert result.returncode == 0, result.stderr
        path = workdir / f"embs_{model.name}" / "pt-cat1.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            assert sorted(handle.keys()) == list(parts)
            assert handle.metadata()["format"] == "hcpdiff-embedding" and handle.metadata()["n_vectors"] == "4"
            vectors = {part: handle.get_tensor(part) for part in parts}
        for part in parts:
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=part.replace("text_encoder", "tokenizer"))
            weight = CLIPTextModel.from_pretrained(model, subfolder=part).get_input_embeddings().weight
            ids = tokenizer("cat", add_special_tokens=False).input_ids  # byte-level tiny vocab: 3 tokens
            expected = weight[[ids[i % len(ids)] for i in range(4)]]
            assert vectors[part].shape == (4, weight.shape[1]) and torch.equal(vectors[part], expected)
    again = cli_in_process(["-m", "hcpdiff.tools.create_embedding", "--model", str(tiny_model), "--name", "pt-cat1",
                            "--emb_dir", f"embs_{tiny_model.name}"], cwd=workdir)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_name_expands_to_all_its_vectors_and_the_weight_covers_them(tiny_model, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    vocab = len(tokenizer)
    vectors = torch.randn(3, encoder.config.hidden_size)
    load_embedding_into([tokenizer], [encoder], ("text_encoder",), "pt-cat1", {"text_encoder": vectors})
    new_ids = list(range(vocab, vocab + 3))
    ids, weights = weighted_tokens(tokenizer, "a {pt-cat1:1.2}")
    assert ids[-3:] == new_ids and weights[-3:] == [1.2] * 3 and weights[0] == 1.0
    row = PromptEncoder(tokenizer, encoder).tokenize(["a pt-cat1, b"])[0].tolist()
    assert row[2:5] == new_ids
    assert torch.equal(encoder.get_input_embeddings().weight[new_ids], vectors)


def test_trainable_rows_leave_every_other_row_without_gradient(tiny_model):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").requires_grad_(False)
    load_embedding_into([tokenizer], [encoder], ("text_encoder",), "pt-x1", {"text_encoder": torch.zeros(2, 32)})
    rows = TrainableTokenRows(encoder.get_input_embeddings())
    encoder.set_input_embeddings(rows)
    vectors = rows.add("pt-x1", tokenizer.convert_tokens_to_ids(["pt-x1", "pt-x1_1"]), torch.ones(2, 32))
    encoder_input = PromptEncoder(tokenizer, encoder).tokenize(["a pt-x1"])
    encoder(encoder_input)[0].sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is vectors and rows.base.weight.grad is None


def test_webui_keys_read_back_and_missing_names_are_one_error(tmp_path):
    sd = {"text_encoder": torch.randn(2, 8)}
    xl = {"text_encoder": torch.randn(2, 8), "text_encoder_2": torch.randn(2, 16)}
    assert set(to_webui(sd)) == {"emb_params"} and set(to_webui(xl)) == {"clip_l", "clip_g"}
    from safetensors.torch import save_file

    save_file(to_webui(xl), str(tmp_path / "theirs.safetensors"))
    back = read_embedding(tmp_path / "theirs.safetensors", ("text_encoder", "text_encoder_2"))
    assert all(torch.equal(back[part], xl[part]) for part in xl)
    write_embedding(tmp_path / "pt-cat1.safetensors", sd, {})
    assert prompt_embedding_names(["a {pt-cat1:1.2}, pt-cat1-ish"], tmp_path) == ["pt-cat1"]
    assert prompt_embedding_names(["{masterpiece:1.2}, {long_hair}"], tmp_path) == []  # tags, not embedding names
    with pytest.raises(ConfigError, match="embedding 'surtr_arknights-1000' not found.*holds pt-cat1, theirs"):
        prompt_embedding_names(["1girl, {surtr_arknights-1000:1.2}"], tmp_path)
