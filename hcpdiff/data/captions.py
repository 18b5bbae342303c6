"""Caption sources: txt sidecars, json / yaml mappings, csv and jsonl tables, each read into {stem: caption}."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from hcpdiff.config.yaml_io import safe_load_bounded
from hcpdiff.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Column names accepted in csv headers and jsonl objects: DiffSynth writes file_name/text, others image/prompt.
FILE_COLUMNS = ("file_name", "image", "video")  # a `video` row names a video file (a video family's clips)
TEXT_COLUMNS = ("text", "prompt")
_TABLE_SUFFIXES = (".json", ".yaml", ".yml", ".csv", ".jsonl")
_ACCEPTED_HEADERS = "'file_name,text' or 'image,prompt'"


@dataclass(frozen=True)
class Columns:
    """Which metadata columns / keys name the image and hold its caption; None = auto-detect. `caption_key` is the
    config key that chose the second column (a condition image's path is read as a caption column)."""

    image: str | None = None
    caption: str | None = None
    caption_key: str = "caption_column"


def load_captions(
    caption_file: str | os.PathLike | None, img_root: str | os.PathLike, where: str, columns: Columns | None = None
) -> dict[str, str]:
    """Read a caption source into {image file stem: caption}; None gives {}."""
    return {image_stem(name): caption for name, caption in load_caption_entries(caption_file, img_root, where, columns).items()}


def load_caption_entries(
    caption_file: str | os.PathLike | None, img_root: str | os.PathLike, where: str, columns: Columns | None = None
) -> dict[str, str]:
    """Read a caption source into {image name as written (posix, maybe a relative path): caption}; None gives {}."""
    if caption_file is None:
        return {}
    caption_path = _resolve(caption_file, img_root, where)
    columns = columns or Columns()
    if caption_path.is_dir():
        return _load_folder(caption_path, columns)
    return _load_table(caption_path, columns)


def load_condition_entries(
    caption_file: str | os.PathLike, img_root: str | os.PathLike, where: str, columns: Columns
) -> dict[str, tuple[str, ...]]:
    """Read a metadata table's condition column into {image key: its input images' paths}: a path, a json / jsonl
    list of paths, or in a csv cell a JSON list (`["a.png", "b.png"]`); empty values are left out."""
    path = _resolve(caption_file, img_root, where)
    if path.is_dir():
        tables = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".csv", ".jsonl"))
        if len(tables) != 1:
            raise DataError(f"{where}: '{path}' must hold one metadata table (.csv, .json or .jsonl) naming the "
                            "input images")
        path = tables[0]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, columns)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path, columns)
    elif suffix == ".json" and isinstance(parsed := _parse_json(path), list):
        rows = _record_rows(parsed, path, columns, "item")
    else:
        raise DataError(f"{where}: input images are named in a .csv, .jsonl or a .json list of records, not '{path}'")
    conditions: dict[str, tuple[str, ...]] = {}
    for name, value, place in rows:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise DataError(f"Caption file '{path}' {place}: '{value}' is not a JSON list of paths.") from exc
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in values if item is not None):
            raise DataError(f"Caption file '{path}' {place}: an input image is a path or a list of paths.")
        paths = tuple(item.strip() for item in values if item and item.strip())
        if paths:
            conditions[image_key(name)] = paths
    return conditions


def _resolve(caption_file: str | os.PathLike, img_root: str | os.PathLike, where: str) -> Path:
    caption_path = Path(caption_file)
    if caption_path.exists():
        return caption_path
    # A bare name such as `captions.json` usually means the file beside the images.
    beside_images = Path(img_root) / caption_path
    if not caption_path.is_absolute() and beside_images.exists():
        return beside_images
    raise DataError(f"{where}: caption file or folder '{caption_file}' does not exist.")


def _load_folder(folder: Path, columns: Columns) -> dict[str, str]:
    tables = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _TABLE_SUFFIXES)
    sidecars = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
    if len(tables) == 1:
        return _load_table(tables[0], columns)
    if len(tables) > 1 and not sidecars:
        names = ", ".join(p.name for p in tables)
        raise DataError(f"Caption folder '{folder}' holds several caption files ({names}); name one as caption_file.")
    return {p.stem: _read_text(p).strip() for p in sidecars}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"Caption file '{path}' is not valid UTF-8 (byte {exc.start}).") from exc
    except OSError as exc:
        raise DataError(f"Caption file '{path}' cannot be read: {exc.strerror or exc}.") from exc


def _load_table(path: Path, columns: Columns) -> dict[str, str]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        parsed = _parse_json(path) if suffix == ".json" else _parse_yaml(path)
        if isinstance(parsed, list):  # DiffSynth's metadata.json: a list of records
            return _collect(_record_rows(parsed, path, columns, "item"), path)
        return _from_mapping(parsed, path)
    if suffix == ".csv":
        return _collect(_csv_rows(path, columns), path)
    if suffix == ".jsonl":
        return _collect(_jsonl_rows(path, columns), path)
    raise DataError(
        f"Caption file '{path}' has an unsupported type '{suffix}'; use a folder of .txt files, .json, .yaml, .csv or .jsonl."
    )


def _parse_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except RecursionError as exc:  # `[[[[...]]]]` nested deeper than Python's stack
        raise DataError(f"Caption file '{path}' nests arrays or objects too deeply to read.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"Caption file '{path}' is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from exc


def _parse_yaml(path: Path) -> object:
    try:
        return safe_load_bounded(_read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at_line = f" at line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"Caption file '{path}' is not valid YAML{at_line}: {getattr(exc, 'problem', None) or exc}.") from exc


def _from_mapping(parsed: object, path: Path) -> dict[str, str]:
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise DataError(
            f"Caption file '{path}' must hold a mapping of image name -> caption or a list of records, "
            f"not a {type(parsed).__name__}."
        )
    return _collect(((str(name), caption, f"key '{name}'") for name, caption in parsed.items()), path)


def _csv_rows(path: Path, columns: Columns) -> Iterable[tuple[str, object, str]]:
    text = _read_text(path)
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"Caption file '{path}' is empty; expected a header {_ACCEPTED_HEADERS}.")
        file_col, text_col = _find_columns([cell.strip() for cell in header], path, ",".join(header), columns)
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(file_col, text_col):
                raise DataError(
                    f"Caption file '{path}' line {reader.line_num} has {len(row)} column(s); the header has {len(header)}."
                )
            rows.append((row[file_col], row[text_col], f"line {reader.line_num}"))
        return rows
    except csv.Error as exc:
        raise DataError(f"Caption file '{path}' is not valid CSV at line {reader.line_num}: {exc}.") from exc


def _find_columns(header: list[str], path: Path, header_text: str, columns: Columns) -> tuple[int, int]:
    lowered = [cell.lower() for cell in header]
    file_col = _column(lowered, columns.image, FILE_COLUMNS)
    text_col = _column(lowered, columns.caption, TEXT_COLUMNS)
    if file_col is None or text_col is None:
        if columns.image is not None or columns.caption is not None:
            wanted = f"'{columns.image or '|'.join(FILE_COLUMNS)},{columns.caption or '|'.join(TEXT_COLUMNS)}'"
            raise DataError(
                f"Caption file '{path}' has the header '{header_text}'; image_column / {columns.caption_key} ask for "
                f"{wanted}."
            )
        raise DataError(f"Caption file '{path}' has the header '{header_text}'; accepted headers are {_ACCEPTED_HEADERS}.")
    return file_col, text_col


def _column(lowered: list[str], wanted: str | None, defaults: tuple[str, ...]) -> int | None:
    names = (wanted,) if wanted is not None else defaults
    return next((lowered.index(name.lower()) for name in names if name.lower() in lowered), None)


def _jsonl_rows(path: Path, columns: Columns) -> Iterable[tuple[str, object, str]]:
    records = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except RecursionError as exc:
            raise DataError(f"Caption file '{path}' line {line_number} nests too deeply to read.") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"Caption file '{path}' line {line_number} is not valid JSON: {exc.msg}.") from exc
    return _record_rows([record for _, record in records], path, columns, "line", [n for n, _ in records])


def _record_rows(
    records: list[object], path: Path, columns: Columns, place: str, numbers: list[int] | None = None
) -> Iterable[tuple[str, object, str]]:
    rows = []
    for position, record in enumerate(records):
        number = numbers[position] if numbers else position
        if not isinstance(record, dict):
            raise DataError(f"Caption file '{path}' {place} {number} must be a JSON object with {_ACCEPTED_HEADERS} keys.")
        keys = list(record)
        file_col, text_col = _find_columns([str(k) for k in keys], path, ",".join(map(str, keys)), columns)
        rows.append((str(record[keys[file_col]]), record[keys[text_col]], f"{place} {number}"))
    return rows


def _collect(entries: Iterable[tuple[str, object, str]], path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    seen: dict[str, str] = {}  # image key -> caption, to catch one image given two captions
    for name, caption, place in entries:
        if caption is None:
            continue
        if isinstance(caption, bool) or not isinstance(caption, (str, int, float)):
            raise DataError(f"Caption file '{path}' {place}: the caption must be text, not a {type(caption).__name__}.")
        key = image_key(name)
        caption_text = str(caption).strip()
        if key in seen and seen[key] != caption_text:
            raise DataError(f"Caption file '{path}' {place}: image '{key}' already has a different caption.")
        seen[key] = caption_text
        captions[normalize_name(name)] = caption_text
    return captions


def normalize_name(name: str) -> str:
    """An image name as a posix relative path: backslashes turned, `./` and surrounding blanks removed."""
    parts = [part for part in PurePosixPath(name.strip().replace("\\", "/")).parts if part not in (".", "/")]
    return "/".join(parts)


def image_key(name: str) -> str:
    """The key an image is looked up by: its relative path (folders kept) without the image extension."""
    base = normalize_name(name)
    # Only image extensions are dropped, so a stem such as `v1.5` keeps its dot.
    if Path(base).suffix.lower() in IMAGE_EXTENSIONS:
        return base[: -len(Path(base).suffix)]
    return base


def image_stem(name: str) -> str:
    """The key an image is looked up by when folders are ignored: its file name without image extension."""
    return image_key(PurePosixPath(normalize_name(name)).name)
