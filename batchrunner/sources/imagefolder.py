"""A Hugging Face imagefolder: a folder with `metadata.jsonl` or `metadata.csv`
whose `file_name` column names each image, relative to the folder. The other
columns are the row's fields (for `--prompt` templates and `--prompt-column`).
`custom_id` is the `file_name`, so `export --format hf-metadata` writes it back.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batchrunner.sources import Row, is_url

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME = "file_name"


def metadata_file(folder: Path) -> Path | None:
    for name in METADATA_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if any((v or "").strip() for v in row.values()):
                    yield reader.line_num, row
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, f"not valid JSON ({exc})"
                continue
            yield number, item if isinstance(item, dict) else "a metadata line must be an object"


def read_imagefolder(folder: Path) -> Iterator[Row]:
    metadata = metadata_file(folder)
    assert metadata is not None
    for number, item in _rows(metadata):
        where = f"{metadata.name} line {number}"
        if isinstance(item, str):
            yield Row(f"line-{number}", number, None, {}, f"{where}: {item}")
            continue
        name = item.get(FILE_NAME)
        if not isinstance(name, str) or not name.strip():
            yield Row(
                f"line-{number}", number, None, item, f"{where}: {FILE_NAME}: missing or empty"
            )
            continue
        name = name.strip()
        if is_url(name):
            yield Row(name, number, {"type": "url", "url": name}, item)
            continue
        yield Row(name, number, {"type": "path", "path": str(folder / name)}, item)
