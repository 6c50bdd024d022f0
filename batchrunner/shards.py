"""Shards: the unit of work and of recovery of the Ray engine (no Ray in here).

A shard is a fixed part of the input: a range of line numbers of a JSONL
file, a range of a caption source's items (walk order of a folder, lines of a
manifest), or one file of a sharded dataset (tar, Parquet). Each is run by the
ordinary runner with its own results part and journal under `RESULTS.parts/`,
so a rerun of a shard is a resume of it; the driver merges finished parts into
the results file (`PartsMerger`).

A source that can be cut into shards is a `ShardedSource`: it plans its
shards once (their names are stable across runs, so a rerun finds its parts)
and gives each one a job source that a Ray worker can call (picklable).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from batchrunner.errors import ConfigError
from batchrunner.reader import InvalidJob, Job, parse_job_lines, unchanged_lines

if TYPE_CHECKING:  # `status` reads parts through this module: it stays light
    from batchrunner.caption import CaptionSource
    from batchrunner.runner import JobSource

DEFAULT_SHARD_SIZE = 1000
"""Jobs per shard: small enough that a lost worker redoes little (its journal
saves the paid part anyway), large enough that per-shard start-up (a process,
a session, reading the part) stays a small share."""


@dataclass(frozen=True, slots=True)
class Shard:
    """One part of the input. `first`/`stop`: the numbers it covers (line
    numbers, walk order), stop excluded; `offset`: where its first line starts
    in a JSONL file (so a worker seeks instead of reading the lines before);
    `file`: the one file a shard of a sharded dataset reads."""

    name: str
    """Stable across runs and safe as a file name: its part is `RESULTS.parts/<name>.jsonl`."""
    first: int = 1
    stop: int = 1
    offset: int = 0
    file: str | None = None

    @property
    def size(self) -> int:
        return self.stop - self.first


class ShardedSource(Protocol):
    """A job source the Ray engine can cut into shards."""

    def plan_shards(self, shard_size: int) -> list[Shard]:
        """Every shard of the source, in order; the same names for the same input."""
        ...

    def shard_jobs(self, shard: Shard) -> JobSource:
        """The jobs of one shard (picklable: it is sent to a Ray worker)."""
        ...

    def identity(self) -> Any:
        """What tells a rerun that the input is still the one its parts were
        made from (JSON); when it changed, every shard runs again."""
        ...


def range_name(prefix: str, first: int, stop: int) -> str:
    return f"{prefix}-{first:09d}-{stop - 1:09d}"


@dataclass(frozen=True, slots=True)
class JsonlShards:
    """Fixed line ranges of a JSONL jobs file."""

    path: Path
    model: str

    def plan_shards(self, shard_size: int) -> list[Shard]:
        """One pass over the file: every `shard_size` lines, where the range starts."""
        shards: list[Shard] = []
        first, offset, position = 1, 0, 0
        number = 0
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if number - first == shard_size:
                    shards.append(Shard(range_name("lines", first, number), first, number, offset))
                    first, offset = number, position
                position += len(line)
        if number >= first:
            shards.append(Shard(range_name("lines", first, number + 1), first, number + 1, offset))
        return shards

    def shard_jobs(self, shard: Shard) -> JobSource:
        return _JsonlShardJobs(self.path, self.model, shard)

    def identity(self) -> Any:
        return input_identity(self.path)


@dataclass(frozen=True, slots=True)
class _JsonlShardJobs:
    path: Path
    model: str
    shard: Shard

    def __call__(self) -> Iterator[Job | InvalidJob]:
        """The shard's lines, numbered as in the whole file. A custom_id that
        another shard's line also has is not caught here (see the README)."""
        shard = self.shard
        with self.path.open("rb") as handle:
            handle.seek(shard.offset)
            lines = itertools.islice(unchanged_lines(handle, self.path), shard.size)
            yield from parse_job_lines(lines, self.model, shard.size, start=shard.first)


@dataclass(frozen=True, slots=True)
class CaptionShards:
    """Fixed ranges of a caption source's items: files in walk order of a
    folder, or lines of a manifest."""

    source: CaptionSource

    def plan_shards(self, shard_size: int) -> list[Shard]:
        """Ranges of `shard_size` items of a folder or manifest; one shard per
        file of a WebDataset or Parquet source (`shard_size` does not apply)."""
        kind = self.source.kind
        if kind in ("webdataset", "parquet"):
            prefix = "tar" if kind == "webdataset" else "parquet"
            return [
                Shard(f"{prefix}-{n:06d}-{_file_safe(name)}", file=str(path))
                for n, (path, name) in enumerate(self.source.dataset_files())
            ]
        if kind not in ("folder", "manifest"):
            raise ConfigError(
                f"--engine ray cuts folders, manifests, WebDataset and Parquet sources into "
                f"shards; a {kind} source runs with the local engine for now"
            )
        count = self.source.count_numbers()
        return [
            Shard(
                range_name("items", first, min(first + shard_size, count + 1)),
                first,
                min(first + shard_size, count + 1),
            )
            for first in range(1, count + 1, shard_size)
        ]

    def shard_jobs(self, shard: Shard) -> JobSource:
        part = copy.copy(self.source)
        if shard.file is not None:
            part.files = frozenset({shard.file})
            # The shard index beside the results file is the local engine's;
            # a shard's own part tells which of its jobs are done.
            part.results_path = None
        else:
            part.numbers = (shard.first, shard.stop)
        return part

    def identity(self) -> Any:
        """A manifest's size and time; a folder's count of files (a walk, no
        reads); each tar or Parquet file's size and time."""
        source = self.source.source
        files = self.source.dataset_files()
        if files:
            return [[name, *input_identity(path)] for path, name in files]
        if source.is_file():
            return input_identity(source)
        return [str(source.resolve()), self.source.count_numbers()]


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


# --------------------------------------------------------------------------- parts


def parts_dir_for(results_path: Path) -> Path:
    """`out.jsonl` -> `out.parts/`: the shards' results parts and journals."""
    name = results_path.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return results_path.with_name(stem + ".parts")


def part_path(parts_dir: Path, shard: Shard) -> Path:
    return parts_dir / f"{shard.name}.jsonl"


PLAN_FILE = "plan.json"
MERGED_FILE = "merged.jsonl"


def input_identity(path: Path) -> list[int]:
    """What tells that the input is the one a plan was made for (size, mtime)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class PartsMerger:
    """Appends each finished shard's part to the results file, crash-safely.

    `merged.jsonl` in the parts folder records, per shard, where its lines
    begin in the results file (before they are appended) and then that they
    are all there. A driver killed between the two leaves a `begin` without a
    `done`: the next driver cuts the results file back to that offset and
    merges the shard again, so a line is never in the results file twice.

    A new plan (the input changed, --retry-errored, --restart) starts the
    merge afresh: every shard runs again (a quick resume for those that are
    done) and the results file is rebuilt from the parts.
    """

    def __init__(self, results_path: Path, parts_dir: Path) -> None:
        self.results_path = results_path
        self.parts_dir = parts_dir
        self.merged: set[str] = set()
        self._log = parts_dir / MERGED_FILE

    def open(self, plan: dict[str, Any], *, fresh: bool) -> None:
        """Load the merge state (or start afresh when the plan differs or `fresh`)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.parts_dir / PLAN_FILE
        earlier = _read_json(plan_path)
        if self.results_path.exists() and earlier is None:
            raise ConfigError(
                f"{self.results_path} exists but was not written by --engine ray (no "
                f"{plan_path}); give another -o, or run it with the local engine"
            )
        if fresh or earlier != plan:
            self._reset()
            _write_durably(plan_path, orjson.dumps(plan))
            return
        begun: dict[str, int] = {}
        for record in _records(self._log):
            if "begin" in record:
                begun[record["begin"]] = record["offset"]
            elif "done" in record:
                self.merged.add(record["done"])
                begun.pop(record["done"], None)
        if begun:  # a driver died while appending one part: cut it back out
            with self.results_path.open("rb+") as handle:
                handle.truncate(min(begun.values()))

    def _reset(self) -> None:
        self.merged.clear()
        self._log.write_bytes(b"")
        self.results_path.write_bytes(b"")

    def merge(self, shard: Shard) -> int:
        """Append the shard's part to the results file; the lines appended."""
        data = part_path(self.parts_dir, shard).read_bytes() if self._has_part(shard) else b""
        with self.results_path.open("ab") as results:
            offset = results.tell()
            self._append_record({"begin": shard.name, "offset": offset})
            results.write(data)
            results.flush()
            os.fsync(results.fileno())
        self._append_record({"done": shard.name})
        self.merged.add(shard.name)
        return data.count(b"\n")

    def _has_part(self, shard: Shard) -> bool:
        return part_path(self.parts_dir, shard).is_file()

    def _append_record(self, record: dict[str, Any]) -> None:
        with self._log.open("ab") as log:
            log.write(orjson.dumps(record) + b"\n")
            log.flush()
            os.fsync(log.fileno())


def unmerged_parts(results_path: Path) -> list[Path]:
    """The results parts of shards not merged into `results_path` yet (a Ray run
    stopped, or still running): what `status` counts beside the results file."""
    parts_dir = parts_dir_for(results_path)
    if not (parts_dir / PLAN_FILE).is_file():
        return []
    merged = {record["done"] for record in _records(parts_dir / MERGED_FILE) if "done" in record}
    return sorted(
        path
        for path in parts_dir.glob("*.jsonl")
        if path.name != MERGED_FILE and path.name.removesuffix(".jsonl") not in merged
    )


def _records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n")[:-1]:  # a torn last record was never acted on
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "CaptionShards",
    "JsonlShards",
    "PartsMerger",
    "Shard",
    "ShardedSource",
    "input_identity",
    "part_path",
    "parts_dir_for",
]
