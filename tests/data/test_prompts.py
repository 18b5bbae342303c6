"""Prompt templates: placeholders filled, other braces kept, no dangling separators."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hcpdiff.data import PromptBuilder, load_templates
from hcpdiff.errors import DataError

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "cfgs" / "prompt_templates"


def build(template: str, caption: str | None, word_names: dict | None = None) -> str:
    return PromptBuilder([template], word_names or {"pt1": "pt-cat1"}).build(caption, random.Random(0))


def test_fills_caption_and_names():
    assert build("a photo of a {pt1}, {caption}", "on grass") == "a photo of a pt-cat1, on grass"


def test_caption_may_use_names():
    assert build("{caption}", "a {pt1} on grass") == "a pt-cat1 on grass"


def test_other_braces_are_kept():
    assert build("{caption}, {surtr:1.2}, {}, {unknown}", "x") == "x, {surtr:1.2}, {}, {unknown}"
    assert build("{caption}", "a {pt1}:1.2 {{x}}") == "a pt-cat1:1.2 {{x}}"


def test_caption_text_is_not_filled_twice():
    assert build("{pt1}, {caption}", "literal {caption}") == "pt-cat1, literal {caption}"


@pytest.mark.parametrize("caption", [None, "", "   "])
@pytest.mark.parametrize(
    "template, expected",
    [
        ("a photo of a {pt1}, {caption}", "a photo of a pt-cat1"),
        ("{caption}, a photo of a {pt1}", "a photo of a pt-cat1"),
        ("{pt1}, {caption}, best quality", "pt-cat1, best quality"),
        ("{caption}", ""),
        ("a photo of a {pt1}", "a photo of a pt-cat1"),
    ],
)
def test_empty_caption_leaves_no_dangling_separator(template, expected, caption):
    assert build(template, caption) == expected


def test_choice_follows_rng():
    builder = PromptBuilder(["a {caption}", "b {caption}", "c {caption}"], {})
    prompts_a = [builder.build("x", random.Random(seed)) for seed in range(20)]
    prompts_b = [builder.build("x", random.Random(seed)) for seed in range(20)]
    assert prompts_a == prompts_b
    assert {p[0] for p in prompts_a} == {"a", "b", "c"}


def test_caption_cannot_be_a_word_name():
    with pytest.raises(DataError, match="caption"):
        PromptBuilder(["{caption}"], {"caption": "x"})


def test_load_templates_skips_blank_and_comment_lines(tmp_path):
    template_file = tmp_path / "t.txt"
    template_file.write_text("# header\n\na photo of a {pt1}\n  the {pt1}, {caption}  \n", encoding="utf-8")
    assert load_templates(str(template_file), "w") == ["a photo of a {pt1}", "the {pt1}, {caption}"]


def test_load_templates_none_is_caption_only():
    assert load_templates(None, "w") == ["{caption}"]


def test_load_templates_missing_file_names_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.dataset1\.source\.s\.prompt_template.*nope\.txt"):
        load_templates(str(tmp_path / "nope.txt"), "data.dataset1.source.s.prompt_template")


def test_load_templates_empty_file(tmp_path):
    template_file = tmp_path / "t.txt"
    template_file.write_text("# only a comment\n")
    with pytest.raises(DataError, match="no template lines"):
        load_templates(str(template_file), "w")


@pytest.mark.parametrize("name", ["caption.txt", "object.txt", "object_caption.txt"])
def test_shipped_templates_load_and_fill(name):
    templates = load_templates(str(TEMPLATES_DIR / name), "w")
    builder = PromptBuilder(templates, {"pt1": "pt-cat1"})
    for template in templates:
        for caption in ("on grass", None):
            prompt = PromptBuilder([template], {"pt1": "pt-cat1"}).build(caption, random.Random(0))
            assert "{" not in prompt and not prompt.startswith(",") and not prompt.endswith(",")
    assert builder.build("on grass", random.Random(0))
