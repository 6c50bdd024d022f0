"""`batchrunner export RESULTS.jsonl --format csv|parquet|jsonl|anthropic|openai`.

csv, parquet and jsonl write one flat row per job (below). anthropic and
openai write each job's result line as those batch APIs write theirs (see
`anthropic_result`, `openai_result`), so parsers written for them read it.

Columns: custom_id, type, text, input_tokens, output_tokens, latency_s,
error_type, error_message. An absent value is empty in CSV and null in JSONL
and Parquet.

Row order:
- `--order file` (default): the results file's order, which is finishing order;
  streamed, one row in memory at a time.
- `--order input --jobs JOBS.jsonl`: the jobs file's order, so that two nights
  line up row for row. A job of the jobs file with no result line gets a row of
  type `missing` (every other column empty): the export has one row per job
  even for a run that is unfinished. Result lines whose job is not in the jobs
  file (the file was edited since) follow at the end, in results-file order,
  with a warning. Memory holds one byte offset per result line, not the rows.
  Job ids are those the runner gives: `line-N` for a line without custom_id,
  `ID#line-N` for a duplicate.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from batchrunner.argtypes import Parser
from batchrunner.price import usage_tokens
from batchrunner.reader import read_jobs
from batchrunner.resultsfile import (
    ReadStats,
    ResultRow,
    ResultsReadError,
    describe_skipped,
    iter_lines,
    iter_rows,
    iter_rows_at,
    message_text,
    parse_timestamp,
    read_row_at,
)

EXIT_OK = 0
EXIT_USAGE = 2

COLUMNS = (
    "custom_id",
    "type",
    "text",
    "input_tokens",
    "output_tokens",
    "latency_s",
    "error_type",
    "error_message",
)
MISSING = "missing"
FLAT_FORMATS = ("csv", "parquet", "jsonl")
BATCH_API_FORMATS = ("anthropic", "openai")
DATASET_FORMATS = ("txt", "hf-metadata", "webdataset")
"""Captions in a dataset's own shape (see `export_datasets`); parquet with --with-source too."""
PARQUET_BATCH_ROWS = 8192

ExportRow = dict[str, Any]


class ExportError(Exception):
    """The export cannot be made (a missing optional dependency, an unreadable jobs file)."""


def export_row(row: ResultRow) -> ExportRow:
    return {
        "custom_id": row.custom_id,
        "type": row.type,
        "text": row.text,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "latency_s": row.latency_s,
        "error_type": row.error_type,
        "error_message": row.error_message,
    }


def missing_row(custom_id: str) -> ExportRow:
    row: ExportRow = dict.fromkeys(COLUMNS)
    row["custom_id"] = custom_id
    row["type"] = MISSING
    return row


def rows_in_file_order(results: Path, stats: ReadStats | None = None) -> Iterator[ExportRow]:
    for row in iter_rows(results, stats):
        yield export_row(row)


def job_ids(jobs: Path) -> Iterator[str]:
    """The custom_id of each job of a jobs file, in order, as the runner names them."""
    try:
        for job in read_jobs(jobs, default_model="claude-3.5-sonnet"):
            yield job.custom_id
    except FileNotFoundError:
        raise ExportError(f"jobs file {jobs} not found") from None
    except IsADirectoryError:
        raise ExportError(f"jobs file {jobs} is a folder") from None
    except OSError as exc:
        raise ExportError(f"cannot read jobs file {jobs}: {exc.strerror}") from None


class InputOrder:
    """Rows in the jobs file's order; `extra` counts results with no job, after iteration."""

    def __init__(self, results: Path, jobs: Path, stats: ReadStats | None = None) -> None:
        self.results = results
        self.jobs = jobs
        self.stats = stats if stats is not None else ReadStats()
        self.extra = 0
        self.missing = 0

    def __iter__(self) -> Iterator[ExportRow]:
        offsets: dict[str, int] = {}
        for offset, row in iter_rows_at(self.results, self.stats):
            offsets.setdefault(row.custom_id, offset)  # iter_rows_at: one line per job
        with self.results.open("rb") as handle:
            for custom_id in job_ids(self.jobs):
                found = offsets.pop(custom_id, None)
                if found is None:
                    self.missing += 1
                    yield missing_row(custom_id)
                else:
                    yield export_row(read_row_at(handle, found))
            self.extra = len(offsets)
            for offset in offsets.values():
                yield export_row(read_row_at(handle, offset))


# ---------------------------------------------------------------------------
# Other APIs' batch results


def anthropic_result(line: dict[str, Any]) -> dict[str, Any]:
    """A result line as Anthropic's Message Batches results file has it:
    `{"custom_id", "result": {"type": "succeeded", "message"}}`, `{"type":
    "errored", "error": {"type": "error", "error": {"type", "message"}}}` or
    `{"type": "expired"}` (types of the `anthropic` SDK: MessageBatchIndividualResponse)."""
    result = line["result"]
    kind = result.get("type")
    if kind == "succeeded":
        shaped: dict[str, Any] = {"type": "succeeded", "message": result["message"]}
    elif kind == "expired":
        shaped = {"type": "expired"}
    else:
        error = _error_of(result)
        shaped = {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": anthropic_error_type(error), "message": _message_of(error)},
            },
        }
    return {"custom_id": line["custom_id"], "result": shaped}


ANTHROPIC_ERROR_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(error: dict[str, Any]) -> str:
    """Anthropic's error type for one of ours: a job refused locally is an invalid
    request; a failed inference an api_error; otherwise the HTTP status decides."""
    kind, status = error.get("type"), error.get("status")
    if kind == "invalid_job":
        return "invalid_request_error"
    if kind == "inference_failed":
        return "api_error"
    by_status = ANTHROPIC_ERROR_BY_STATUS.get(status) if isinstance(status, int) else None
    if by_status is not None:
        return by_status
    return "invalid_request_error" if kind == "invalid_request" else "api_error"


FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
"""Anthropic's stop_reason -> OpenAI's finish_reason."""


def openai_result(line: dict[str, Any]) -> dict[str, Any]:
    """A result line as OpenAI's Batch output (and error) files have it:
    `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

    A success's body is a `chat.completion`; a request the API refused or
    failed has its status and an OpenAI error body; an expired job has no
    response and the error code `batch_expired`, and a request that never got
    an answer `request_timeout` (OpenAI's codes for those)."""
    custom_id = line["custom_id"]
    request_id = line.get("request_id")
    result = line["result"]
    kind = result.get("type")
    response: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    if kind == "succeeded":
        response = {
            "status_code": 200,
            "request_id": request_id,
            "body": chat_completion(result["message"], line),
        }
    else:
        error = _error_of(result)
        status = error.get("status")
        if kind == "expired":
            failure = {"code": "batch_expired", "message": _message_of(error)}
        elif not isinstance(status, int):
            if error.get("type") == "retries_exhausted":
                failure = {"code": "request_timeout", "message": _message_of(error)}
            else:
                status = 400 if error.get("type") in ("invalid_job", "invalid_request") else 500
        if failure is None:
            assert isinstance(status, int)
            response = {
                "status_code": status,
                "request_id": request_id,
                "body": {
                    "error": {
                        "message": _message_of(error),
                        "type": "invalid_request_error" if status < 500 else "server_error",
                        "param": None,
                        "code": error.get("type"),
                    }
                },
            }
    seed = f"{custom_id}\n{request_id}".encode()
    return {
        "id": f"batch_req_{hashlib.blake2b(seed, digest_size=12).hexdigest()}",
        "custom_id": custom_id,
        "response": response,
        "error": failure,
    }


def chat_completion(message: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic message as an OpenAI `chat.completion` object."""
    tokens_in, tokens_out = usage_tokens(message)
    finished = parse_timestamp(line.get("finished_at"))
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(finished) if finished is not None else 0,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": message_text(message) or "",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(message.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        },
        "system_fingerprint": None,
    }


def _error_of(result: dict[str, Any]) -> dict[str, Any]:
    error = result.get("error")
    return error if isinstance(error, dict) else {}


def _message_of(error: dict[str, Any]) -> str:
    message = error.get("message")
    return message if isinstance(message, str) else ""


def batch_api_lines(results: Path, fmt: str, stats: ReadStats) -> Iterator[ExportRow]:
    """Each job's latest result line in the shape of `fmt` (anthropic, openai)."""
    shape = anthropic_result if fmt == "anthropic" else openai_result
    for line in iter_lines(results, stats):
        yield shape(line)


# ---------------------------------------------------------------------------
# Writers


def write_csv(rows: Iterable[ExportRow], out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
        count += 1
    return count


def write_jsonl(rows: Iterable[ExportRow], out: IO[bytes]) -> int:
    count = 0
    for row in rows:
        out.write(orjson.dumps(row) + b"\n")
        count += 1
    return count


def import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "Parquet export needs pyarrow: pip install 'batchrunner[parquet]' "
            "(or pip install pyarrow); csv and jsonl need nothing more"
        ) from None
    return pa, pq


def parquet_schema() -> Any:
    pa, _ = import_pyarrow()
    return pa.schema(
        [
            ("custom_id", pa.string()),
            ("type", pa.string()),
            ("text", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("latency_s", pa.float64()),
            ("error_type", pa.string()),
            ("error_message", pa.string()),
        ]
    )


def write_parquet(rows: Iterable[ExportRow], path: Path) -> int:
    """Stream rows into a Parquet file in row groups of PARQUET_BATCH_ROWS."""
    pa, pq = import_pyarrow()
    schema = parquet_schema()
    count = 0
    batch: list[ExportRow] = []
    with pq.ParquetWriter(str(path), schema) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch.clear()
        if batch or not count:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def export(rows: Iterable[ExportRow], fmt: str, output: Path | None) -> int:
    """Write rows in `fmt` to `output` (stdout when None, but for parquet); the jsonl
    writer serves the batch APIs' formats too. Returns rows."""
    if output is None:
        if fmt == "parquet":
            raise ExportError("--format parquet writes a binary file: name it with -o OUT.parquet")
        if fmt == "csv":
            return write_csv(rows, sys.stdout)
        count = write_jsonl(rows, sys.stdout.buffer)  # jsonl and the batch APIs' lines
        sys.stdout.buffer.flush()
        return count
    # Written beside the target and renamed: an interrupted export leaves no half file.
    partial = output.with_name(output.name + ".partial")
    try:
        if fmt == "parquet":
            count = write_parquet(rows, partial)
        elif fmt == "csv":
            with partial.open("w", encoding="utf-8", newline="") as handle:
                count = write_csv(rows, handle)
        else:
            with partial.open("wb") as handle:
                count = write_jsonl(rows, handle)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return count


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="batchrunner export",
        description="Write a results file as one flat row per job (csv, jsonl, parquet: "
        "custom_id, type, text, input_tokens, output_tokens, latency_s, error_type, "
        "error_message), or as the result lines of Anthropic's or OpenAI's batch APIs.",
    )
    parser.add_argument("results", type=Path, help="results file (JSONL)")
    parser.add_argument(
        "--format",
        choices=(*FLAT_FORMATS, *BATCH_API_FORMATS, *DATASET_FORMATS),
        default="csv",
        help="anthropic: Message Batches results; openai: Batch output file lines; "
        "txt (--to DIR), hf-metadata (-o metadata.jsonl), webdataset (--to DIR) and parquet "
        "--with-source: captions for a captioned dataset",
    )
    parser.add_argument("--to", type=Path, metavar="DIR", help="folder for txt and webdataset")
    parser.add_argument(
        "--with-source",
        metavar="SOURCE",
        help="the captioned Parquet file or folder (parquet: its rows plus caption columns), "
        "or shards (webdataset: their key order)",
    )
    parser.add_argument(
        "--id-column", help="the --id-column the captions were made with (parquet --with-source)"
    )
    parser.add_argument(
        "--order",
        choices=("file", "input"),
        default="file",
        help="file: the results file's (finishing) order; input: the jobs file's order, "
        "with a 'missing' row for a job without result (needs --jobs; flat formats only)",
    )
    parser.add_argument("--jobs", type=Path, help="jobs file, for --order input")
    parser.add_argument(
        "-o", "--output", type=Path, help="output file (default stdout; required for parquet)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.order == "input" and args.jobs is None:
        parser.error("--order input needs --jobs JOBS.jsonl")
    if args.order == "input" and args.format in BATCH_API_FORMATS:
        parser.error(
            f"--order input is for {', '.join(FLAT_FORMATS)}: {args.format} batch results are "
            "matched by custom_id, in any order, as that API writes them"
        )
    for what, path in (("results", args.results), ("jobs", args.jobs)):
        if path is not None and not path.is_file():
            print(f"batchrunner export: error: {what} file {path} not found", file=sys.stderr)
            return EXIT_USAGE
    if args.format in DATASET_FORMATS or args.with_source is not None:
        return _dataset_export(parser, args)
    stats = ReadStats()
    rows: Iterable[ExportRow]
    order: InputOrder | None = None
    if args.format in BATCH_API_FORMATS:
        rows = batch_api_lines(args.results, args.format, stats)
    elif args.order == "input":
        order = rows = InputOrder(args.results, args.jobs, stats)
    else:
        rows = rows_in_file_order(args.results, stats)
    try:
        if args.format == "parquet":
            import_pyarrow()  # fail before reading anything
        count = export(rows, args.format, args.output)
    except (ResultsReadError, ExportError) as exc:
        print(f"batchrunner export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        print(f"batchrunner export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    warning = describe_skipped(args.results, stats)
    if warning:
        print(f"batchrunner export: warning: {warning}", file=sys.stderr)
    if order is not None and order.extra:
        print(
            f"batchrunner export: warning: {order.extra} result(s) have no job in {args.jobs}; "
            "they are the last rows",
            file=sys.stderr,
        )
    if args.output is not None:
        missing = f", {order.missing} missing" if order is not None and order.missing else ""
        print(f"batchrunner export: {count} row(s){missing} -> {args.output}", file=sys.stderr)
    return EXIT_OK


def _dataset_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from batchrunner import export_datasets as ds

    fmt = args.format
    if fmt in ("txt", "webdataset") and args.to is None:
        parser.error(f"--format {fmt} writes files into a folder: name it with --to DIR")
    if fmt == "hf-metadata" and args.output is None:
        parser.error("--format hf-metadata: name the file with -o metadata.jsonl")
    if fmt not in ("parquet", "webdataset") and args.with_source is not None:
        parser.error("--with-source is for --format parquet and --format webdataset")
    if fmt == "parquet" and args.output is None:
        parser.error("--format parquet --with-source: name the output with -o OUT")
    try:
        if fmt == "txt":
            stats, target = ds.export_txt(args.results, args.to), args.to
        elif fmt == "hf-metadata":
            stats, target = ds.export_hf_metadata(args.results, args.output), args.output
        elif fmt == "webdataset":
            stats = ds.export_webdataset(args.results, args.to, args.with_source)
            target = args.to
        else:
            source = Path(args.with_source)
            if not source.exists():
                raise ds.DatasetExportError(f"source {source} not found")
            stats = ds.export_parquet(args.results, source, args.output, args.id_column)
            target = args.output
    except (ResultsReadError, ds.DatasetExportError) as exc:
        print(f"batchrunner export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"batchrunner export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # pyarrow's errors: a source that is not Parquet
        print(f"batchrunner export: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"batchrunner export: {stats.written:,} caption(s) -> {target}", file=sys.stderr)
    for line in stats.lines():
        print(f"batchrunner export: {line}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
