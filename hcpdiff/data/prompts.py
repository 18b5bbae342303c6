"""Prompt templates: pick one line per sample and fill `{caption}` and the word_names placeholders."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from hcpdiff.errors import DataError

# Only `{identifier}` is a placeholder; `{surtr:1.2}` and `{}` are prompt syntax and pass through.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# `{caption}` with the separators around it, so an empty caption takes one separator with it.
_CAPTION_WITH_SEPARATORS = re.compile(r"(\s*,\s*)?\{caption\}(\s*,\s*)?")
DEFAULT_TEMPLATES = ("{caption}",)


class PromptBuilder:
    """Turns a caption into a prompt with one randomly chosen template."""

    def __init__(self, templates: Sequence[str], word_names: Mapping[str, object] | None = None) -> None:
        if not templates:
            raise DataError("A prompt builder needs at least one template line.")
        self.templates = list(templates)
        self.word_names = {str(name): str(word) for name, word in (word_names or {}).items()}
        if "caption" in self.word_names:
            raise DataError("word_names cannot define 'caption'; that placeholder is the image's caption.")

    def build(self, caption: str | None, rng: random.Random) -> str:
        """Pick a template with `rng` and fill it with the caption and the word names."""
        template = self.templates[0] if len(self.templates) == 1 else rng.choice(self.templates)
        caption_text = self._fill_names(caption.strip()) if caption else ""
        if not caption_text:
            template = _CAPTION_WITH_SEPARATORS.sub(_keep_one_separator, template)
        # One pass over the template, so text coming from the caption is never re-scanned for `{caption}`.
        filled = _PLACEHOLDER.sub(lambda m: caption_text if m.group(1) == "caption" else self._word(m), template)
        return filled.strip().strip(",").strip()

    def _fill_names(self, text: str) -> str:
        return _PLACEHOLDER.sub(self._word, text)

    def _word(self, match: re.Match) -> str:
        return self.word_names.get(match.group(1), match.group(0))


def _keep_one_separator(match: re.Match) -> str:
    # Between two parts, one ", " remains; at either end none does.
    return ", " if match.group(1) and match.group(2) else ""


def load_templates(path: str | os.PathLike | None, where: str) -> list[str]:
    """Read template lines (blank lines and `#` comments skipped); None gives ["{caption}"]."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    template_path = Path(path)
    if not template_path.is_file():
        raise DataError(
            f"{where}: prompt template file '{path}' does not exist (templates shipped with hcpdiff are in cfgs/prompt_templates/)."
        )
    try:
        lines = template_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: prompt template file '{path}' is not valid UTF-8 (byte {exc.start}).") from exc
    templates = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not templates:
        raise DataError(f"{where}: prompt template file '{path}' holds no template lines.")
    return templates
