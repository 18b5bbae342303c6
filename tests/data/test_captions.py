"""Caption sources: every form reads into {stem: caption}; broken files name themselves."""

from __future__ import annotations

import json

import pytest

from hcpdiff.data import load_captions
from hcpdiff.errors import DataError

WHERE = "data.dataset1.source.data_source1.caption_file"


def test_none_gives_no_captions(tmp_path):
    assert load_captions(None, str(tmp_path), WHERE) == {}


def test_txt_sidecars_in_folder(tmp_path):
    (tmp_path / "1.txt").write_text("  a cat on grass \n", encoding="utf-8")
    (tmp_path / "2.txt").write_text("ein Hund, 犬", encoding="utf-8")
    assert load_captions(str(tmp_path), str(tmp_path), WHERE) == {"1": "a cat on grass", "2": "ein Hund, 犬"}


def test_folder_with_one_json_uses_it(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({"1": "one", "2.png": "two"}), encoding="utf-8")
    assert load_captions(str(tmp_path), str(tmp_path), WHERE) == {"1": "one", "2": "two"}


def test_folder_with_several_tables_and_no_txt_is_ambiguous(tmp_path):
    (tmp_path / "a.json").write_text("{}", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="several caption files"):
        load_captions(str(tmp_path), str(tmp_path), WHERE)


def test_json_mapping_keys_normalised_to_stem(tmp_path):
    caption_file = tmp_path / "caps.json"
    caption_file.write_text(json.dumps({"1": "one", "2.PNG": "two", "sub/3.jpg": "three", "v1.5": "dotted"}))
    assert load_captions(str(caption_file), str(tmp_path), WHERE) == {
        "1": "one", "2": "two", "3": "three", "v1.5": "dotted",
    }


def test_yaml_mapping(tmp_path):
    caption_file = tmp_path / "caps.yaml"
    caption_file.write_text("1: one\n2.webp: ' two '\n", encoding="utf-8")
    assert load_captions(str(caption_file), str(tmp_path), WHERE) == {"1": "one", "2": "two"}


def test_bare_name_is_found_beside_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img_root = tmp_path / "imgs"
    img_root.mkdir()
    (img_root / "caps.json").write_text('{"1": "one"}')
    assert load_captions("caps.json", str(img_root), WHERE) == {"1": "one"}


@pytest.mark.parametrize("header", ["file_name,text", "image,prompt", "Image,Prompt", "FILE_NAME,TEXT"])
def test_csv_headers(tmp_path, header):
    caption_file = tmp_path / "metadata.csv"
    caption_file.write_text(f'{header}\n1.png,one\n2.jpg,"two, with comma"\n', encoding="utf-8")
    assert load_captions(str(caption_file), str(tmp_path), WHERE) == {"1": "one", "2": "two, with comma"}


def test_csv_bad_header_names_file_and_header(tmp_path):
    caption_file = tmp_path / "metadata.csv"
    caption_file.write_text("path,caption\n1.png,one\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_captions(str(caption_file), str(tmp_path), WHERE)
    message = str(excinfo.value)
    assert "metadata.csv" in message and "path,caption" in message
    assert "file_name,text" in message and "image,prompt" in message


def test_csv_short_row_names_line(tmp_path):
    caption_file = tmp_path / "metadata.csv"
    caption_file.write_text("file_name,text\n1.png,one\n2.png\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3"):
        load_captions(str(caption_file), str(tmp_path), WHERE)


def test_jsonl(tmp_path):
    caption_file = tmp_path / "metadata.jsonl"
    caption_file.write_text(
        '{"file_name": "1.png", "text": "one"}\n\n{"image": "2.png", "prompt": "two"}\n', encoding="utf-8"
    )
    assert load_captions(str(caption_file), str(tmp_path), WHERE) == {"1": "one", "2": "two"}


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    caption_file = tmp_path / "metadata.jsonl"
    caption_file.write_text('{"file_name": "1.png", "text": "one"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"metadata\.jsonl' line 2"):
        load_captions(str(caption_file), str(tmp_path), WHERE)


def test_bad_json_names_file_and_line(tmp_path):
    caption_file = tmp_path / "caps.json"
    caption_file.write_text('{\n  "1": "one",\n  "2": two\n}', encoding="utf-8")
    with pytest.raises(DataError, match=r"caps\.json.*line 3"):
        load_captions(str(caption_file), str(tmp_path), WHERE)


def test_bad_yaml_names_file(tmp_path):
    caption_file = tmp_path / "caps.yaml"
    caption_file.write_text("1: [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps\.yaml"):
        load_captions(str(caption_file), str(tmp_path), WHERE)


def test_json_not_a_mapping(tmp_path):
    caption_file = tmp_path / "caps.json"
    caption_file.write_text('["one", "two"]', encoding="utf-8")
    with pytest.raises(DataError, match="mapping"):
        load_captions(str(caption_file), str(tmp_path), WHERE)


def test_missing_file_names_key_path_and_path(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_captions(str(tmp_path / "nope.json"), str(tmp_path), WHERE)
    assert WHERE in str(excinfo.value) and "nope.json" in str(excinfo.value)


def test_non_utf8_txt_names_file(tmp_path):
    (tmp_path / "1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"1\.txt.*UTF-8"):
        load_captions(str(tmp_path), str(tmp_path), WHERE)


def test_unsupported_type(tmp_path):
    caption_file = tmp_path / "caps.xml"
    caption_file.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported"):
        load_captions(str(caption_file), str(tmp_path), WHERE)
