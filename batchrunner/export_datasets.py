"""Captions out in the shape each dataset ecosystem reads (`batchrunner export`):

- `--format txt --to DIR`: one `<image name>.txt` per succeeded image, keeping
  its relative path (`a/b.jpg` -> `DIR/a/b.txt`), its shard and key
  (`00000.tar/k` -> `DIR/00000/k.txt`) or its Parquet file and row
  (`f.parquet:7` -> `DIR/f/7.txt`), as kohya-style trainers read them;
- `--format hf-metadata -o metadata.jsonl`: `{"file_name", "text"}` lines, what
  `datasets.load_dataset("imagefolder")` reads beside the images;
- `--format parquet --with-source SOURCE -o OUT`: every row and column of the
  source, in order, plus `caption` and `caption_error`; one output file per
  input file when SOURCE is a folder (OUT is then a folder); streamed a row
  group at a time;
- `--format webdataset --to DIR`: per input shard, a shard of `<key>.txt`
  members (the caption), in the source's key order with `--with-source`, else
  sorted by key: WebDataset loaders join two shard sets sample by sample by
  `__key__`.

Results are looked up by id through a map of id digests to byte offsets in
the results file (`ResultIndex`): 16 bytes per job, not the captions. Images
that errored get no caption file or member; they are counted and listed.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from batchrunner.digests import DigestMap
from batchrunner.jsonl import count_lines
from batchrunner.resultsfile import ResultRow, iter_rows_at, read_row_at
from batchrunner.sources import IMAGE_SUFFIXES, parquet, webdataset

SHOWN_ERRORS = 10


class DatasetExportError(Exception):
    """The export cannot be made: a usage error, said in one line."""


@dataclass(slots=True)
class ExportStats:
    written: int = 0
    errored: int = 0
    missing: int = 0
    refused: int = 0
    """Ids that cannot name a file safely (absolute, `..`)."""
    examples: list[str] = field(default_factory=list)

    def note(self, custom_id: str, why: str) -> None:
        if len(self.examples) < SHOWN_ERRORS:
            self.examples.append(f"{custom_id}: {why}")

    def lines(self) -> list[str]:
        out = []
        if self.errored:
            out.append(f"{self.errored:,} image(s) errored and got no caption")
        if self.missing:
            out.append(f"{self.missing:,} image(s) of the source have no result yet")
        if self.refused:
            out.append(f"{self.refused:,} id(s) cannot name a file safely and were left out")
        return out + [f"  {example}" for example in self.examples]


class ResultIndex:
    """Each job's latest result line, found by id (see the module's docstring)."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.offsets = DigestMap(count_lines(results))
        for offset, row in iter_rows_at(results):
            self.offsets.put(row.custom_id, offset)
        self._handle = results.open("rb")

    def get(self, custom_id: str) -> ResultRow | None:
        offset = self.offsets.get(custom_id)
        if offset is None:
            return None
        row = read_row_at(self._handle, offset)
        return row if row.custom_id == custom_id else None  # a digest collision

    def close(self) -> None:
        self._handle.close()


def _rows(results: Path) -> Iterator[ResultRow]:
    with results.open("rb") as handle:
        for offset, _ in iter_rows_at(results):
            yield read_row_at(handle, offset)


def caption_of(row: ResultRow) -> str | None:
    return row.text if row.type == "succeeded" and row.text is not None else None


def error_of(row: ResultRow) -> str:
    if row.type == "succeeded":
        return "no text in the answer"
    return f"{row.error_type or row.type}: {row.error_message or ''}".strip(": ")


def txt_path(custom_id: str) -> PurePosixPath | None:
    """Where an image's caption goes, relative to DIR; None for an unsafe id."""
    shard, slash, key = custom_id.partition(".tar/")
    if slash:
        name = f"{shard}/{key}"
    elif ".parquet:" in custom_id:
        name = custom_id.replace(".parquet:", "/", 1)
    else:
        name = custom_id
        lower = name.lower()
        for suffix in IMAGE_SUFFIXES:
            if lower.endswith(suffix):
                name = name[: -len(suffix)]
                break
    path = PurePosixPath(name + ".txt")
    if path.is_absolute() or ".." in path.parts or "\\" in name or not name.strip("/"):
        return None
    return path


def export_txt(results: Path, folder: Path) -> ExportStats:
    stats = ExportStats()
    root = folder.resolve()
    for row in _rows(results):
        text = caption_of(row)
        if text is None:
            stats.errored += 1
            stats.note(row.custom_id, error_of(row))
            continue
        relative = txt_path(row.custom_id)
        if relative is None:
            stats.refused += 1
            stats.note(row.custom_id, "not a safe file name")
            continue
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
        stats.written += 1
    return stats


def export_hf_metadata(results: Path, output: Path) -> ExportStats:
    stats = ExportStats()
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("wb") as handle:
            for row in _rows(results):
                text = caption_of(row)
                if text is None:
                    stats.errored += 1
                    stats.note(row.custom_id, error_of(row))
                    continue
                handle.write(orjson.dumps({"file_name": row.custom_id, "text": text}) + b"\n")
                stats.written += 1
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return stats


# --------------------------------------------------------------------------- Parquet


def export_parquet(
    results: Path, source: Path, output: Path, id_column: str | None = None
) -> ExportStats:
    try:
        pq = parquet.import_pyarrow()
        files = parquet.parquet_files(source)
    except parquet.ParquetSourceError as exc:
        raise DatasetExportError(str(exc)) from None
    names = parquet.file_names(files, source)
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise DatasetExportError(f"{source} is a folder: -o must name a folder, not a file")
        targets = [output / name for name in names]
    else:
        targets = [output]
    stats = ExportStats()
    index = ResultIndex(results)
    try:
        for path, name, target in zip(files, names, targets, strict=True):
            _export_parquet_file(pq, index, path, name, target, id_column, stats)
    finally:
        index.close()
    return stats


def _export_parquet_file(
    pq: Any,
    index: ResultIndex,
    path: Path,
    name: str,
    target: Path,
    id_column: str | None,
    stats: ExportStats,
) -> None:
    import pyarrow as pa

    pq_file = pq.ParquetFile(str(path))
    schema = pq_file.schema_arrow
    if id_column is not None and id_column not in schema.names:
        raise DatasetExportError(f"{path} has no column {id_column!r} (--id-column)")
    out_schema = schema.append(pa.field("caption", pa.string())).append(
        pa.field("caption_error", pa.string())
    )
    out_schema = out_schema.with_metadata(_hf_metadata_with_captions(schema.metadata))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    row = 0
    try:
        with pq.ParquetWriter(str(partial), out_schema) as writer:
            for group in range(pq_file.metadata.num_row_groups):
                table = pq_file.read_row_group(group)
                if id_column is not None:
                    ids = [
                        None if v is None else str(v) for v in table.column(id_column).to_pylist()
                    ]
                else:
                    ids = [f"{name}:{row + i}" for i in range(table.num_rows)]
                row += table.num_rows
                captions: list[str | None] = []
                errors: list[str | None] = []
                for custom_id in ids:
                    found = index.get(custom_id) if custom_id is not None else None
                    if found is None:
                        stats.missing += 1
                        captions.append(None)
                        errors.append("no result")
                        continue
                    text = caption_of(found)
                    captions.append(text)
                    errors.append(None if text is not None else error_of(found))
                    if text is None:
                        stats.errored += 1
                    else:
                        stats.written += 1
                table = table.append_column("caption", pa.array(captions, pa.string()))
                table = table.append_column("caption_error", pa.array(errors, pa.string()))
                writer.write_table(table.replace_schema_metadata(out_schema.metadata))
                del table
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _hf_metadata_with_captions(metadata: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """The schema metadata, with the new columns added to the `huggingface` features
    (`datasets` checks the features against the columns)."""
    metadata = dict(metadata or {})
    raw = metadata.get(b"huggingface")
    if raw:
        try:
            info = orjson.loads(raw)
            features = info["info"]["features"]
            for column in ("caption", "caption_error"):
                features[column] = {"dtype": "string", "_type": "Value"}
            metadata[b"huggingface"] = orjson.dumps(info)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass  # not the shape `datasets` writes: kept as it was
    return metadata


# --------------------------------------------------------------------------- WebDataset


def export_webdataset(results: Path, folder: Path, source: str | None) -> ExportStats:
    stats = ExportStats()
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        try:
            shards = webdataset.shard_paths(source)
        except webdataset.ShardError as exc:
            raise DatasetExportError(str(exc)) from None
        index = ResultIndex(results)
        try:
            for shard, name in zip(shards, webdataset.shard_names(shards), strict=True):
                keys = (key for key, _, _ in webdataset.iter_samples(shard))
                _write_shard(folder / name, name, keys, index.get, stats)
        finally:
            index.close()
        return stats
    grouped: dict[str, list[tuple[str, ResultRow]]] = {}
    for row in _rows(results):
        shard_name, slash, key = row.custom_id.partition(".tar/")
        if not slash:
            stats.refused += 1
            stats.note(row.custom_id, "not a WebDataset id (<shard>.tar/<key>)")
            continue
        grouped.setdefault(shard_name + ".tar", []).append((key, row))
    for name, rows in sorted(grouped.items()):
        found = {key: row for key, row in rows}
        _write_shard(
            folder / name,
            name,
            iter(sorted(found)),
            lambda custom_id, found=found: found.get(custom_id.partition(".tar/")[2]),
            stats,
        )
    return stats


def _write_shard(
    target: Path, name: str, keys: Iterator[str], lookup: Any, stats: ExportStats
) -> None:
    if ".." in PurePosixPath(name).parts or PurePosixPath(name).is_absolute():
        stats.refused += 1
        stats.note(name, "not a safe file name")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                custom_id = f"{name}/{key}"
                row = lookup(custom_id)
                if row is None:
                    stats.missing += 1
                    continue
                text = caption_of(row)
                if text is None:
                    stats.errored += 1
                    stats.note(custom_id, error_of(row))
                    continue
                data = text.encode("utf-8")
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
                stats.written += 1
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
