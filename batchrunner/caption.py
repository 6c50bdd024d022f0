"""`batchrunner caption SOURCE --prompt TEXT`: caption a folder of images, or the
images a CSV/JSONL manifest lists, without writing a jobs file by hand.

SOURCE is a folder, walked recursively in sorted order (hidden files and
folders skipped; images recognised by their magic bytes, whatever their names;
other files skipped; both counted), or a manifest: a CSV file with a header, or
a JSONL file of objects, with a path column (`--path-column`, default `path`,
relative paths resolved against the manifest's folder) and optionally a
per-image prompt (`--prompt-column`, default `prompt`; `--prompt` is the
fallback). Jobs are produced lazily, one per image, in Segmind's native shape:
an image block naming the local file (read, checked and maybe downsized only
when the job is submitted) and the prompt. `custom_id` is the image's path
relative to SOURCE (the manifest's path value), so a rerun resumes.

Every run option of `batchrunner JOBS.jsonl` works here too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchrunner import cli, interrupts
from batchrunner.argtypes import positive_int
from batchrunner.digests import DigestSet
from batchrunner.display import print_summary
from batchrunner.errors import ResultsFileError
from batchrunner.estimate import add_dry_run_options, dry_run, print_report
from batchrunner.imagecheck import not_accepted_error, other_format, sniff_file
from batchrunner.images import ImageError
from batchrunner.reader import MAX_CUSTOM_ID_CHARS, InvalidJob, Job, digest, fingerprint
from batchrunner.resultsfile import PriorResults, load_prior
from batchrunner.runner import ConfigError, run
from batchrunner.sources import (
    Row,
    fill_template,
    imagefolder,
    is_url,
    parquet,
    template_fields,
    webdataset,
)

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SHOWN_SKIPPED = 5


@dataclass(slots=True)
class SourceStats:
    """What one pass over the source met (reset by every pass)."""

    jobs: int = 0
    hidden_skipped: int = 0
    non_images_skipped: int = 0
    non_image_examples: list[str] = field(default_factory=list)
    other_skipped: int = 0
    """Symbolic links to folders, sockets and the like."""
    unreadable: int = 0
    shards_skipped: int = 0
    complete: bool = False

    def notes(self) -> list[str]:
        notes = []
        if self.hidden_skipped:
            notes.append(f"skipped {self.hidden_skipped:,} hidden file(s) or folder(s)")
        if self.non_images_skipped:
            shown = ", ".join(self.non_image_examples)
            more = self.non_images_skipped - len(self.non_image_examples)
            notes.append(
                f"skipped {self.non_images_skipped:,} file(s) that are not images: {shown}"
                + (f" and {more:,} more" if more > 0 else "")
            )
        if self.other_skipped:
            notes.append(f"skipped {self.other_skipped:,} link(s) to folders or special file(s)")
        if self.unreadable:
            notes.append(f"could not list {self.unreadable:,} folder(s)")
        if self.shards_skipped:
            notes.append(f"{self.shards_skipped:,} shard(s) done earlier: not opened again")
        return notes


class CaptionSource:
    """The jobs of a folder or manifest; each call is a fresh lazy pass (a `JobSource`)."""

    def __init__(
        self,
        source: Path,
        *,
        prompt: str | None,
        instruction: str | None = None,
        model: str = "claude-3.5-sonnet",
        max_side: int | None = None,
        path_column: str = "path",
        prompt_column: str = "prompt",
        path_base: Path | None = None,
        image_column: str | None = None,
        id_column: str | None = None,
        numbers: tuple[int, int] | None = None,
        files: frozenset[str] | None = None,
    ) -> None:
        self.source = source
        self.numbers = numbers
        """Only the items numbered first <= n < stop (walk order in a folder, line
        numbers in a manifest): one shard of the source (batchrunner.shards)."""
        self.files = files
        """Only the rows of these tar or Parquet files (their paths, as str): one
        shard of a WebDataset or Parquet source (batchrunner.shards)."""
        self.kind = source_kind(source)
        self.is_folder = self.kind == "folder"
        self.image_column = image_column
        self.id_column = id_column
        self.prompt = prompt
        self.instruction = instruction
        self.model = model
        self.max_side = max_side
        self.path_column = path_column
        self.prompt_column = prompt_column
        root = source if source.is_dir() else source.parent
        if self.kind == "webdataset":
            self.shards = webdataset.shard_paths(str(source))
            root = Path(os.path.commonpath([p.resolve().parent for p in self.shards]))
        self.root = root.resolve()
        self.path_base = (path_base or root).resolve()
        """Folder that the image paths in the jobs are relative to (the jobs_dir)."""
        self.stats = SourceStats()
        self.results_path: Path | None = None
        """The run's results file: WebDataset shards done in it are not opened again."""

    def __call__(self) -> Iterator[Job | InvalidJob]:
        self.stats = SourceStats()
        items = {
            "folder": self._folder,
            "manifest": self._manifest,
        }.get(self.kind, self._dataset)()
        for item in items:
            self.stats.jobs += 1
            yield item
        self.stats.complete = True

    def check(self) -> None:
        """Usage errors found before any job is made (ConfigError)."""
        if self.is_folder:
            if not self.prompt:
                raise ConfigError("--prompt is required to caption a folder")
            return
        if self.kind in ("webdataset", "imagefolder"):
            if not self.prompt:
                raise ConfigError(f"--prompt is required to caption a {self.kind} source")
            return
        if self.kind == "parquet":
            self._check_parquet()
            return
        if manifest_kind(self.source) == "csv":
            columns = csv_columns(self.source)
            if self.path_column not in columns:
                raise ConfigError(
                    f"manifest {self.source} has no {self.path_column!r} column (columns: "
                    f"{', '.join(columns) or 'none'}); name it with --path-column"
                )
            if not self.prompt and self.prompt_column not in columns:
                raise ConfigError(
                    f"manifest {self.source} has no {self.prompt_column!r} column: give --prompt"
                )

    # ------------------------------------------------------------------ folder

    def _folder(self) -> Iterator[Job | InvalidJob]:
        prompt = self.prompt or ""
        first, stop = self.numbers or (1, None)
        for number, (path, relative) in enumerate(self._walk(self.root, ""), start=1):
            if number < first:
                continue  # another shard's: not even sniffed
            if stop is not None and number >= stop:
                break
            try:
                media_type, head = sniff_file(path, relative)
            except ImageError as exc:
                yield InvalidJob.of_message(_safe_id(relative), number, str(exc))
                continue
            if media_type is None:
                if other_format(head) is None:
                    self.stats.non_images_skipped += 1
                    if len(self.stats.non_image_examples) < SHOWN_SKIPPED:
                        self.stats.non_image_examples.append(relative)
                    continue
                yield InvalidJob.of_message(
                    _safe_id(relative), number, str(not_accepted_error(relative, head))
                )
                continue
            yield self._job(relative, path, number, prompt)

    def _walk(self, folder: Path, prefix: str) -> Iterator[tuple[Path, str]]:
        """(path, path relative to the root, '/'-separated) of every regular file,
        depth first, each folder's entries sorted by name; hidden ones skipped."""
        try:
            with os.scandir(folder) as scan:
                entries = sorted(
                    (entry.name, entry.is_dir(follow_symlinks=False), entry.is_file())
                    for entry in scan
                )
        except OSError:
            self.stats.unreadable += 1
            return
        for name, is_dir, is_file in entries:
            if name.startswith("."):
                self.stats.hidden_skipped += 1
            elif is_dir:
                yield from self._walk(folder / name, f"{prefix}{name}/")
            elif is_file:
                yield folder / name, prefix + name
            else:
                self.stats.other_skipped += 1

    # ------------------------------------------------------------------ manifest

    def _manifest(self) -> Iterator[Job | InvalidJob]:
        rows = (
            _csv_rows(self.source)
            if manifest_kind(self.source) == "csv"
            else _jsonl_rows(self.source)
        )
        seen: set[str] = set()
        first, stop = self.numbers or (1, None)
        for number, row in rows:
            if number < first or (stop is not None and number >= stop):
                # Another shard's row: its id only, for the duplicate check.
                seen.add(self._row_id(number, row))
                continue
            item = self._manifest_item(number, row)
            if item.custom_id in seen:
                message = (
                    f"line {number}: {self.path_column}: duplicate {item.custom_id!r} "
                    "(an earlier line has it)"
                )
                unique = f"{item.custom_id}#line-{number}"
                while unique in seen:
                    unique += "#dup"
                item = InvalidJob.of_message(unique, number, message)
            seen.add(item.custom_id)
            yield item

    def _row_id(self, number: int, row: Any) -> str:
        """The custom_id a manifest row gets (as `_manifest_item` names it), unchecked."""
        value = row.get(self.path_column) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            return f"line-{number}"
        return _safe_id(value.strip())

    def count_numbers(self) -> int:
        """The highest number an item of the source may have (files walked in a
        folder, lines of a manifest): shards cover 1 to this."""
        if self.is_folder:
            return sum(1 for _ in self._walk(self.root, ""))
        with self.source.open("rb") as handle:
            return sum(1 for _ in handle)

    def _manifest_item(self, number: int, row: Any) -> Job | InvalidJob:
        fallback = f"line-{number}"
        if isinstance(row, str):  # a line that is not a JSON object: its error
            return InvalidJob.of_message(fallback, number, f"line {number}: {row}")
        value = row.get(self.path_column)
        if not isinstance(value, str) or not value.strip():
            return InvalidJob.of_message(
                fallback, number, f"line {number}: {self.path_column}: missing or empty"
            )
        value = value.strip()
        if is_url(value):
            image: dict[str, Any] = {"type": "url", "url": value}
            return self._row_job(Row(value, number, image, row), f"line {number}")
        prompt = row.get(self.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            prompt = self.prompt
        if not prompt:
            return InvalidJob.of_message(
                _safe_id(value),
                number,
                f"line {number}: {self.prompt_column}: missing, and no --prompt was given",
            )
        try:
            prompt = fill_template(prompt, row)
        except KeyError as exc:
            return InvalidJob.of_message(
                _safe_id(value),
                number,
                f"line {number}: --prompt names {{{exc.args[0]}}}: no such column, or it is empty",
            )
        candidate = Path(value).expanduser()
        path = candidate if candidate.is_absolute() else self.root / candidate
        try:
            media_type, head = sniff_file(path, value)
        except ImageError as exc:  # missing, a folder, a FIFO or device, unreadable
            return InvalidJob.of_message(_safe_id(value), number, str(exc))
        if media_type is None:
            return InvalidJob.of_message(
                _safe_id(value), number, str(not_accepted_error(value, head))
            )
        return self._job(value, path, number, prompt)

    # ------------------------------------------------------------------ datasets

    def _check_parquet(self) -> None:
        try:
            pq = parquet.import_pyarrow()
            self.parquet_files = parquet.parquet_files(self.source)
            first = pq.ParquetFile(str(self.parquet_files[0]))
            label = str(self.parquet_files[0])
            self.parquet_image = parquet.find_image_column(first, self.image_column, label)
            if self.id_column is not None:
                parquet.check_columns(first, [self.id_column], label, "check --id-column")
            if not self.prompt:
                parquet.check_columns(
                    first, [self.prompt_column], label, "give --prompt or --prompt-column"
                )
            elif self.prompt_column != "prompt":
                parquet.check_columns(first, [self.prompt_column], label, "check --prompt-column")
            if self.prompt:
                parquet.check_columns(
                    first, template_fields(self.prompt), label, "--prompt names it as {column}"
                )
        except (parquet.ParquetSourceError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # pyarrow's own errors: a file that is not Parquet
            raise ConfigError(f"{self.source}: cannot read as Parquet ({exc})") from None

    def dataset_rows(self) -> Iterator[Row]:
        """The rows of a WebDataset, Parquet or imagefolder source, in order."""
        if self.kind == "imagefolder":
            yield from imagefolder.read_imagefolder(self.root)
        elif self.kind == "webdataset":
            number = 1
            for shard, name in zip(self.shards, webdataset.shard_names(self.shards), strict=True):
                if not self.wanted(shard):
                    continue
                for row in webdataset.read_shard(shard, name, number):
                    number = row.number + 1
                    yield row
        elif self.kind == "parquet":
            column, kind = self.parquet_image
            fields = [self.prompt_column, *template_fields(self.prompt or "")]
            files = self.parquet_files
            number = 1
            for path, name in zip(files, parquet.file_names(files, self.source), strict=True):
                if not self.wanted(path):
                    continue
                for row in parquet.read_file(
                    path,
                    name,
                    image_column=column,
                    kind=kind,
                    id_column=self.id_column,
                    field_columns=fields,
                    start=number,
                ):
                    number = row.number + 1
                    yield row

    def _dataset(self) -> Iterator[Job | InvalidJob]:
        seen = DigestSet()
        rows = self._shard_rows() if self.kind == "webdataset" else self.dataset_rows()
        for row in rows:
            if not isinstance(row, Row):  # a job of a shard that is not opened again
                yield row
                continue
            where = f"image {row.custom_id!r}"
            item = self._row_job(row, where)
            if item.custom_id in seen:
                message = f"{where}: duplicate id (an earlier row has it)"
                item = InvalidJob.of_message(
                    f"{item.custom_id}#row-{row.number}", row.number, message
                )
            seen.add(item.custom_id)
            yield item

    def _shard_rows(self) -> Iterator[Row | Job | InvalidJob]:
        """`dataset_rows` of WebDataset shards, but a shard whose every key has a
        result that answers the same request (the same shard, unchanged, with the
        same settings) is not opened: its jobs are named from the shard index
        beside the results file, so that the runner skips them."""
        index = ShardIndex(self.results_path) if self.results_path is not None else None
        settings = self._settings_digest()
        number = 1
        for shard, name in zip(self.shards, webdataset.shard_names(self.shards), strict=True):
            if not self.wanted(shard):
                continue  # another Ray shard's file
            identity = _shard_identity(shard)
            if index is not None:
                done = index.done_jobs(name, identity, settings, self.model, number)
                if done is not None:
                    self.stats.shards_skipped += 1
                    number += len(done)
                    yield from done
                    continue
            keys: list[str] = []
            for row in webdataset.read_shard(shard, name, number):
                number = row.number + 1
                keys.append(row.custom_id.removeprefix(name + "/"))
                yield row
            if index is not None:
                index.record(name, identity, settings, keys)

    def wanted(self, path: Path) -> bool:
        """Whether a tar or Parquet file is this source's to read (see `files`)."""
        return self.files is None or str(path) in self.files

    def dataset_files(self) -> list[tuple[Path, str]]:
        """(path, name in ids) of each tar or Parquet file of a dataset source."""
        if self.kind == "webdataset":
            return list(zip(self.shards, webdataset.shard_names(self.shards), strict=True))
        if self.kind == "parquet":
            files = self.parquet_files
            return list(zip(files, parquet.file_names(files, self.source), strict=True))
        return []

    def _settings_digest(self) -> str:
        """What a job of a shard depends on besides the shard's bytes."""
        settings = [self.model, self.prompt, self.instruction, self.max_side, self.prompt_column]
        return digest(orjson.dumps(settings))

    def _row_job(self, row: Row, where: str) -> Job | InvalidJob:
        """The job of one dataset row (or manifest line): its image and its prompt,
        from `--prompt-column` or the `--prompt` template filled from the row."""
        custom_id = _safe_id(row.custom_id)
        if row.error is not None or row.image is None:
            return InvalidJob.of_message(custom_id, row.number, row.error or f"{where}: no image")
        prompt = row.fields.get(self.prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            prompt = self.prompt
        if not prompt:
            return InvalidJob.of_message(
                custom_id, row.number, f"{where}: {self.prompt_column}: missing, and no --prompt"
            )
        try:
            prompt = fill_template(prompt, row.fields)
        except KeyError as exc:
            return InvalidJob.of_message(
                custom_id,
                row.number,
                f"{where}: --prompt names {{{exc.args[0]}}}: no such field, or it is empty",
            )
        source = dict(row.image)
        if source["type"] == "path":
            source["path"] = self._job_path(Path(source["path"]))
        if self.max_side is not None:
            source["max_side"] = self.max_side
        body = caption_body_from(source, prompt, self.instruction)
        return Job(custom_id, row.number, self.model, body, fingerprint(self.model, body))

    # ------------------------------------------------------------------ jobs

    def _job(self, custom_id: str, path: Path, number: int, prompt: str) -> Job | InvalidJob:
        if len(custom_id) > MAX_CUSTOM_ID_CHARS:
            return InvalidJob.of_message(
                _safe_id(custom_id),
                number,
                f"image {custom_id[:60]!r}...: path longer than the {MAX_CUSTOM_ID_CHARS} "
                "characters a custom_id may have",
            )
        body = caption_body(self._job_path(path), prompt, self.instruction, self.max_side)
        return Job(custom_id, number, self.model, body, fingerprint(self.model, body))

    def _job_path(self, path: Path) -> str:
        """The image's path as the job names it: relative to `path_base` when it can be."""
        absolute = path if path.is_absolute() else Path.cwd() / path
        try:
            return Path(os.path.relpath(absolute, self.path_base)).as_posix()
        except ValueError:  # another drive (Windows)
            return str(absolute)


class ShardIndex:
    """`RESULTS.shards.jsonl`: per shard read to its end, its identity, the settings
    its jobs were made with, and its keys (the jobs it had). Appended to; the last
    line of a shard counts. Results are looked up in the results file as the
    runner left it (`load_prior`, 8 bytes per job)."""

    def __init__(self, results: Path) -> None:
        self.path = results.with_name(results.name + ".shards.jsonl")
        self.entries: dict[str, dict[str, Any]] = {}
        self._prior: PriorResults | None = None
        self._results = results
        if self.path.is_file():
            with self.path.open("rb") as handle:
                for line in handle:
                    try:
                        entry = orjson.loads(line)
                        self.entries[entry["shard"]] = entry
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line: that shard is read again

    def done_jobs(
        self, name: str, identity: list[int], settings: str, model: str, number: int
    ) -> list[Job | InvalidJob] | None:
        """Stand-ins the runner skips for every job of a done shard, else None."""
        entry = self.entries.get(name)
        if entry is None or entry.get("identity") != identity or entry.get("settings") != settings:
            return None
        if self._prior is None:
            try:
                self._prior = load_prior(self._results, repair=False)
            except (OSError, ResultsFileError):
                return None
        jobs: list[Job | InvalidJob] = []
        for offset, key in enumerate(entry.get("keys", [])):
            custom_id = f"{name}/{key}"
            prior = self._prior.get(custom_id)
            if prior is None or prior.outcome not in ("succeeded", "invalid_job"):
                return None
            # The same shard and settings make the same request: the line's own
            # fingerprint is this job's (see rerun.same_request).
            fp = prior.fingerprint or ""
            if prior.outcome == "succeeded":
                jobs.append(Job(custom_id, number + offset, model, {}, fp))
            else:
                jobs.append(InvalidJob(custom_id, number + offset, "", fp))
        return jobs

    def record(self, name: str, identity: list[int], settings: str, keys: list[str]) -> None:
        entry = {"shard": name, "identity": identity, "settings": settings, "keys": keys}
        self.entries[name] = entry
        with self.path.open("ab") as handle:
            handle.write(orjson.dumps(entry) + b"\n")


def _shard_identity(shard: Path) -> list[int]:
    info = shard.stat()
    return [info.st_size, info.st_mtime_ns]


def caption_body(
    image_path: str, prompt: str, instruction: str | None, max_side: int | None
) -> dict[str, Any]:
    """A Segmind native request body: the image (a local path) and the prompt."""
    source: dict[str, Any] = {"type": "path", "path": image_path}
    if max_side is not None:
        source["max_side"] = max_side
    return caption_body_from(source, prompt, instruction)


def caption_body_from(
    source: dict[str, Any], prompt: str, instruction: str | None
) -> dict[str, Any]:
    """A Segmind native request body: the image (any image source) and the prompt."""
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": source},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
    }
    if instruction:
        body["instruction"] = instruction
    return body


def source_kind(source: Path) -> str:
    """folder, imagefolder, webdataset, parquet or manifest."""
    if source.is_dir():
        if imagefolder.metadata_file(source) is not None:
            return "imagefolder"
        if any(p.suffix == ".tar" for p in source.iterdir()):
            return "webdataset"
        if next(source.rglob("*.parquet"), None) is not None:
            return "parquet"
        return "folder"
    if webdataset.is_shard_spec(str(source)):
        return "webdataset"
    if source.suffix.lower() == ".parquet":
        return "parquet"
    return "manifest"


def manifest_kind(path: Path) -> str:
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return kind
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if start.startswith(b"{") else "csv"


def csv_columns(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle, dialect=_dialect(path)), [])
    return [column.strip() for column in header]


def _dialect(path: Path) -> type[csv.Dialect]:
    return csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, dialect=_dialect(path))
        header = [column.strip() for column in next(reader, [])]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            yield reader.line_num, dict(zip(header, row, strict=False))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, f"not valid JSON ({exc})"
                continue
            yield number, row if isinstance(row, dict) else "a manifest line must be an object"


def _safe_id(custom_id: str) -> str:
    if 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return custom_id
    digest = hashlib.blake2b(custom_id.encode(), digest_size=8).hexdigest()
    return f"{custom_id[:100]}...#{digest}"


def default_output(source: Path) -> Path:
    """`<folder>.captions.results.jsonl` beside the folder, `<manifest stem>.captions...`
    beside the manifest."""
    if source.is_dir():
        resolved = source.resolve()
        return resolved.parent / f"{resolved.name}.captions.results.jsonl"
    return source.with_name(f"{source.stem}.captions.results.jsonl")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The main command's parser (every run option) plus the caption options."""
    parser = cli.build_parser()
    parser.prog = "batchrunner caption"
    parser.usage = (
        "batchrunner caption SOURCE [--prompt TEXT] [--instruction TEXT] [-o RESULTS.jsonl] "
        "[--max-image-side N] [--write-jobs JOBS.jsonl] [--dry-run] [run options]"
    )
    parser.description = (
        "Caption every image of a folder (recursively; images recognised by their bytes) or "
        "of a CSV/JSONL manifest, with the run options of 'batchrunner JOBS.jsonl'."
    )
    # Reword the main command's positional and -o for SOURCE (argparse has no
    # public way to edit an action it already holds).
    for action in parser._actions:
        if action.dest == "jobs":
            action.metavar = "SOURCE"
            action.help = "folder of images, or a CSV/JSONL manifest with a path column"
        elif action.dest == "output":
            action.help = "results file (default SOURCE.captions.results.jsonl beside SOURCE)"
    parser.add_argument("--prompt", help="what to ask about each image")
    parser.add_argument("--instruction", help="system prompt for every image")
    parser.add_argument(
        "--path-column", default="path", help="manifest column with the image path (%(default)s)"
    )
    parser.add_argument(
        "--prompt-column",
        default="prompt",
        help="manifest column with a per-image prompt, else --prompt (%(default)s)",
    )
    parser.add_argument(
        "--image-column",
        help="Parquet column with the images: bytes, a {bytes, path} struct or a path/URL "
        "(default: the first column holding images)",
    )
    parser.add_argument(
        "--id-column", help="Parquet column with each image's id (default: FILE:ROW)"
    )
    parser.add_argument(
        "--max-image-side",
        type=positive_int,
        help="downsize images whose longer side is larger (default: send as they are)",
    )
    parser.add_argument(
        "--write-jobs", type=Path, metavar="JOBS.jsonl", help="write a jobs file, do not run"
    )
    if "--dry-run" not in parser._option_string_actions:  # the main command may have them
        add_dry_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _caption(args, argv)
    except (ConfigError, ResultsFileError) as exc:
        print(f"batchrunner caption: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def make_source(args: argparse.Namespace, path_base: Path | None = None) -> CaptionSource:
    source_path: Path = args.jobs
    is_pattern = webdataset.is_shard_spec(str(source_path)) and "{" in str(source_path)
    if not is_pattern and not source_path.exists():
        raise ConfigError(f"{source_path} not found")
    if not is_pattern and not source_path.is_dir() and not source_path.is_file():
        raise ConfigError(f"{source_path} is neither a folder nor a manifest file")
    try:
        source = CaptionSource(
            source_path,
            prompt=args.prompt,
            instruction=args.instruction,
            model=args.model,
            max_side=args.max_image_side,
            path_column=args.path_column,
            prompt_column=args.prompt_column,
            path_base=path_base,
            image_column=args.image_column,
            id_column=args.id_column,
        )
    except webdataset.ShardError as exc:
        raise ConfigError(str(exc)) from None
    source.check()
    return source


def _caption(args: argparse.Namespace, argv: list[str]) -> int:
    cli.check_engine_options(args)
    if args.write_jobs is not None:
        return write_jobs(make_source(args, args.write_jobs.resolve().parent), args.write_jobs)
    source = make_source(args)
    if args.dry_run:
        report = dry_run(
            source(),
            source.path_base,
            rpm=args.rpm,
            polls_count={"yes": True, "no": False}.get(args.polls_count),
            price_in=args.price_in,
            price_out=args.price_out,
            output_tokens_per_job=args.output_tokens,
        )
        report.notes.extend(source.stats.notes())
        output = args.output or default_output(args.jobs)
        report.notes.extend(cli.dry_run_notes(args, output, jobs=source, jobs_dir=source.path_base))
        print_report(report)
        return report.exit_code
    output = args.output or default_output(args.jobs)
    if args.restart and not cli._confirm_restart(output, args.yes):
        print("batchrunner: not restarted", file=sys.stderr)
        return cli.EXIT_USAGE
    return cli.run_command(
        lambda args, argv: _run(args, argv, source, output), args, ["caption", *argv]
    )


def write_jobs(source: CaptionSource, path: Path) -> int:
    """Write the source's valid jobs as a jobs file; report the others on stderr."""
    written = 0
    invalid: list[InvalidJob] = []
    with path.open("wb") as handle:
        for item in source():
            if isinstance(item, InvalidJob):
                if len(invalid) < SHOWN_SKIPPED:
                    invalid.append(item)
                continue
            line = {"custom_id": item.custom_id, "model": item.model, **item.body}
            handle.write(orjson.dumps(line) + b"\n")
            written += 1
    skipped = source.stats.jobs - written
    print(f"batchrunner caption: wrote {written:,} job(s) to {path}", file=sys.stderr)
    for item in invalid:
        print(f"batchrunner caption: left out {item.custom_id}: {item.message}", file=sys.stderr)
    if skipped > len(invalid):
        print(f"batchrunner caption: ... {skipped - len(invalid):,} more left out", file=sys.stderr)
    for note in source.stats.notes():
        print(f"batchrunner caption: {note}", file=sys.stderr)
    return 0


async def _run(
    args: argparse.Namespace, argv: list[str], source: CaptionSource, output: Path
) -> int:
    if not args.restart and not args.retry_errored:
        source.results_path = output
    async with cli._api_origin(args) as (base_url, key, time_scale):
        config = cli.run_config(
            args,
            output=output,
            base_url=base_url,
            key=key,
            time_scale=time_scale,
            jobs=source,
            jobs_dir=source.path_base,
        )
        if args.engine == "ray":
            from batchrunner.shards import CaptionShards

            total = count_candidates(source)
            return await cli.run_on_ray(args, argv, CaptionShards(source), config, total)
        display = cli.make_display(args, 0)
        if display.mode != "off":
            display.total = count_candidates(source)
        with display:
            outcome = await run(
                config,
                on_tick=display.update,
                on_notice=cli.say,
                signals_before_start=interrupts.take,
            )
    total = source.stats.jobs if source.stats.complete else display.total
    print_summary(outcome, output, total, quiet=args.quiet)
    for note in source.stats.notes():
        print(f"batchrunner caption: {note}", file=sys.stderr)
    cli._print_ending(outcome, argv)
    return outcome.exit_code


def count_candidates(source: CaptionSource) -> int:
    """Files that may become jobs (for the progress display; not sniffed, so an upper bound)."""
    if source.kind == "parquet":
        pq = parquet.import_pyarrow()
        return sum(pq.ParquetFile(str(p)).metadata.num_rows for p in source.parquet_files)
    if source.kind == "webdataset":
        return sum(1 for shard in source.shards for _ in webdataset.iter_samples(shard))
    if source.kind == "imagefolder":
        metadata = imagefolder.metadata_file(source.root)
        assert metadata is not None
        with metadata.open("rb") as handle:
            return sum(1 for line in handle if line.strip()) - (metadata.suffix == ".csv")
    if not source.is_folder:
        with source.source.open("rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        return lines - (manifest_kind(source.source) == "csv")
    count = 0
    for _root, folders, files in os.walk(source.root):
        folders[:] = [name for name in folders if not name.startswith(".")]
        count += sum(1 for name in files if not name.startswith("."))
    return count


if __name__ == "__main__":
    raise SystemExit(main())
