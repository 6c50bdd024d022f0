"""Parquet files (a file, or a folder of them), read one row group at a time.

The image column (`--image-column`, else the first column holding images) is
binary bytes, a Hugging Face `Image` struct `{bytes, path}`, or a string: a
path (relative to the file's folder) or an http(s) URL. Binary and struct
images are not read here: the job names the cell (file, row, column) and the
submit reads it (see `imagesource`). `custom_id` is the `--id-column` value,
else `<file name>:<row>` (row counted from 0 within the file).

pyarrow is an extra: `pip install 'batchrunner[datasets]'`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrunner.sources import IMAGE_SUFFIXES, Row, is_url


class ParquetSourceError(ValueError):
    """A usage error about a Parquet source (missing column, no pyarrow)."""


def import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetSourceError(
            "reading Parquet needs pyarrow: pip install 'batchrunner[datasets]'"
        ) from None
    return pq


def parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise ParquetSourceError(f"{path}: no .parquet files in this folder")
        return files
    return [path]


def file_names(files: Sequence[Path], root: Path) -> list[str]:
    """Each file's name in ids: relative to the folder given (its own name for a file)."""
    return [p.relative_to(root).as_posix() if root.is_dir() else p.name for p in files]


def image_kind(field: Any) -> str | None:
    """'binary', 'struct' (HF Image) or 'string' for a column type that can hold images."""
    import pyarrow as pa

    kind = field.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        if "bytes" in names:
            return "struct"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def _hf_image_columns(schema: Any) -> list[str]:
    """Columns the `huggingface` schema metadata declares as `Image` features."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        features = orjson.loads(raw).get("info", {}).get("features", {})
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [
        name
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "Image"
    ]


def _looks_like_image_ref(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    return is_url(value) or value.strip().lower().endswith(IMAGE_SUFFIXES)


def find_image_column(pq_file: Any, name: str | None, label: str) -> tuple[str, str]:
    """(column, kind) of the image column: the named one, else the first holding images."""
    schema = pq_file.schema_arrow
    if name is not None:
        if name not in schema.names:
            raise ParquetSourceError(
                f"{label} has no column {name!r} (columns: {', '.join(schema.names)})"
            )
        kind = image_kind(schema.field(name))
        if kind is None:
            raise ParquetSourceError(
                f"{label}: column {name!r} is {schema.field(name).type}, not binary image bytes, "
                "a {bytes, path} struct or a path/URL string"
            )
        return name, kind
    for column in _hf_image_columns(schema):
        if column in schema.names and image_kind(schema.field(column)) is not None:
            return column, image_kind(schema.field(column)) or "struct"
    for field in schema:
        if image_kind(field) in ("binary", "struct"):
            return field.name, image_kind(field) or "binary"
    strings = [f.name for f in schema if image_kind(f) == "string"]
    if strings and pq_file.metadata.num_rows:
        first = pq_file.read_row_group(0, columns=strings).slice(0, 16).to_pydict()
        for column in strings:
            if any(_looks_like_image_ref(v) for v in first[column]):
                return column, "string"
    raise ParquetSourceError(
        f"{label}: no column holds images (columns: {', '.join(schema.names)}); "
        "name one with --image-column"
    )


def check_columns(pq_file: Any, columns: Sequence[str], label: str, flag: str) -> None:
    names = pq_file.schema_arrow.names
    for column in columns:
        if column not in names:
            raise ParquetSourceError(
                f"{label} has no column {column!r} (columns: {', '.join(names)}); {flag}"
            )


def read_file(
    path: Path,
    name: str,
    *,
    image_column: str,
    kind: str,
    id_column: str | None,
    field_columns: Sequence[str],
    start: int = 1,
) -> Iterator[Row]:
    """The rows of one file, a row group at a time, without the image bytes."""
    pq = import_pyarrow()
    pq_file = pq.ParquetFile(str(path))
    names = pq_file.schema_arrow.names
    wanted = [c for c in dict.fromkeys([*field_columns, id_column]) if c and c in names]
    wanted = [c for c in wanted if c != image_column or kind == "string"]
    if kind == "string" and image_column not in wanted:
        wanted.append(image_column)
    row = 0
    number = start
    for group in range(pq_file.metadata.num_row_groups):
        table = pq_file.read_row_group(group, columns=wanted) if wanted else None
        count = pq_file.metadata.row_group(group).num_rows
        columns = table.to_pydict() if table is not None else {}
        del table
        for index in range(count):
            fields = {column: values[index] for column, values in columns.items()}
            custom_id = f"{name}:{row}"
            error: str | None = None
            if id_column is not None:
                value = fields.get(id_column)
                if value is None or (isinstance(value, str) and not value.strip()):
                    error = f"{name} row {row}: {id_column}: missing or empty"
                else:
                    custom_id = str(value)
            image: dict[str, Any] | None = None
            if error is None:
                if kind == "string":
                    value = fields.get(image_column)
                    if not isinstance(value, str) or not value.strip():
                        error = f"{name} row {row}: {image_column}: missing or empty"
                    elif is_url(value.strip()):
                        image = {"type": "url", "url": value.strip()}
                    else:
                        candidate = Path(value.strip()).expanduser()
                        full = candidate if candidate.is_absolute() else path.parent / candidate
                        image = {"type": "path", "path": str(full)}
                else:
                    image = {"type": "path", "path": str(path), "row": row, "column": image_column}
            yield Row(custom_id, number, image, fields, error)
            row += 1
            number += 1
