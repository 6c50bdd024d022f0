"""Result lines, torn-tail repair, loading an existing results file, and the journal."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchrunner.journal import JournalRecord, journal_path_for, load_journal
from batchrunner.results import (
    ResultsFileError,
    errored,
    expired,
    iso_utc,
    load_results,
    repair_torn_tail,
    result_line,
    succeeded,
)

T = 1_795_608_000.0  # 2026-11-25T12:00:00Z
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "A red square."}],
    "usage": {"input_tokens": 56, "output_tokens": 31},
}


def jsonl(*objs: Any) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def ok_line(custom_id: str) -> dict[str, Any]:
    return result_line(custom_id, succeeded(MESSAGE), attempts=1, submitted_at=T, finished_at=T + 1)


def err_line(custom_id: str) -> dict[str, Any]:
    return result_line(custom_id, errored("invalid_job", "bad", line=3), finished_at=T)


def exp_line(custom_id: str) -> dict[str, Any]:
    return result_line(custom_id, expired("gone"), finished_at=T)


# --------------------------------------------------------------------------- iso_utc


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (T, "2026-11-25T12:00:00.000Z"),
        (T + 0.123, "2026-11-25T12:00:00.123Z"),
        (T + 11.456, "2026-11-25T12:00:11.456Z"),
        (T + 0.9999, "2026-11-25T12:00:00.999Z"),  # milliseconds are truncated
        (T + 0.001, "2026-11-25T12:00:00.001Z"),
        (T + 86399.5, "2026-11-26T11:59:59.500Z"),
        (951_782_400.0, "2000-02-29T00:00:00.000Z"),
    ],
)
def test_iso_utc(epoch: float, text: str) -> None:
    assert iso_utc(epoch) == text


def test_iso_utc_shape() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", iso_utc(T + 0.5))


# --------------------------------------------------------------------------- result_line


def test_result_line_succeeded_fields() -> None:
    got = result_line(
        "img-001",
        succeeded(MESSAGE),
        request_id="2c7f59ea-1",
        attempts=1,
        submitted_at=T + 0.123,
        finished_at=T + 11.456,
    )
    assert got == {
        "custom_id": "img-001",
        "result": {"type": "succeeded", "message": MESSAGE},
        "request_id": "2c7f59ea-1",
        "attempts": 1,
        "submitted_at": "2026-11-25T12:00:00.123Z",
        "finished_at": "2026-11-25T12:00:11.456Z",
        "latency_s": pytest.approx(11.333),
    }
    assert orjson.loads(orjson.dumps(got)) == got


def test_result_line_without_submission() -> None:
    got = result_line(
        "line-4", errored("invalid_job", "line 4: messages: missing", line=4), finished_at=T
    )
    assert got["custom_id"] == "line-4"
    assert got["request_id"] is None
    assert got["attempts"] == 0
    assert got["submitted_at"] is None
    assert got["latency_s"] is None
    assert got["finished_at"] == "2026-11-25T12:00:00.000Z"
    assert got["result"] == {
        "type": "errored",
        "error": {
            "type": "invalid_job",
            "message": "line 4: messages: missing",
            "status": None,
            "line": 4,
        },
    }


@pytest.mark.parametrize(
    ("submitted", "finished", "latency"),
    [(T, T, 0.0), (T, T + 0.0004, 0.0), (T, T + 1.2345, 1.234), (T, T + 3599.9999, 3600.0)],
)
def test_result_line_latency_rounded_to_ms(
    submitted: float, finished: float, latency: float
) -> None:
    line = result_line("x", succeeded(MESSAGE), submitted_at=submitted, finished_at=finished)
    assert line["latency_s"] == pytest.approx(latency, abs=1e-6)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (succeeded(MESSAGE), {"type": "succeeded", "message": MESSAGE}),
        (
            errored("invalid_request", "bad body", 400),
            {
                "type": "errored",
                "error": {"type": "invalid_request", "message": "bad body", "status": 400},
            },
        ),
        (
            errored("inference_failed", "blocked", 422),
            {
                "type": "errored",
                "error": {"type": "inference_failed", "message": "blocked", "status": 422},
            },
        ),
        (
            errored("retries_exhausted", "HTTP 503", 503),
            {
                "type": "errored",
                "error": {"type": "retries_exhausted", "message": "HTTP 503", "status": 503},
            },
        ),
        (
            expired("gone"),
            {"type": "expired", "error": {"type": "expired", "message": "gone", "status": 404}},
        ),
    ],
)
def test_result_bodies(result: Any, expected: Any) -> None:
    assert result == expected


# --------------------------------------------------------------------------- repair_torn_tail


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b'{"a": 1}\n{"b": 2}\n', b'{"a": 1}\n{"b": 2}\n'),  # complete: untouched
        (b'{"a": 1}\n{"b": 2', b'{"a": 1}\n'),  # torn last line cut
        (b'{"a": 1}\n{', b'{"a": 1}\n'),
        (b'{"a": 1}\n\n{"b"', b'{"a": 1}\n\n'),
        (b'{"a": 1', b""),  # no newline at all
        (b"\0\0\0\0", b""),
        (b"\n", b"\n"),
        (b"", b""),
    ],
)
def test_repair_torn_tail(tmp_path: Path, content: bytes, kept: bytes) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(content)
    assert repair_torn_tail(path) == len(content) - len(kept)
    assert path.read_bytes() == kept


def test_repair_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    assert repair_torn_tail(path) == 0
    assert not path.exists()


@pytest.mark.parametrize("tail", [70_000, 200_000])
def test_repair_torn_tail_longer_than_a_read_chunk(tmp_path: Path, tail: int) -> None:
    path = tmp_path / "results.jsonl"
    head = jsonl(*(ok_line(f"j{i}") for i in range(50)))
    path.write_bytes(head + b"x" * tail)
    assert repair_torn_tail(path) == tail
    assert path.read_bytes() == head


def test_repair_long_file_without_any_newline(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"y" * 150_000)
    assert repair_torn_tail(path) == 150_000
    assert path.read_bytes() == b""


def test_repair_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b":')
    assert repair_torn_tail(path) == 5
    assert repair_torn_tail(path) == 0
    assert path.read_bytes() == b'{"a": 1}\n'


# --------------------------------------------------------------------------- load_results


def test_load_results_done_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    content = jsonl(ok_line("a"), err_line("b"), ok_line("c"), exp_line("d"), ok_line("e"))
    path.write_bytes(content)
    state = load_results(path)
    assert state.done == {"a", "b", "c", "d", "e"}
    assert dict(state.by_type) == {"succeeded": 3, "errored": 1, "expired": 1}
    assert state.torn_bytes == 0
    assert path.read_bytes() == content


def test_load_results_counts_a_repeated_custom_id_once(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(jsonl(ok_line("a"), ok_line("a"), err_line("b")))
    state = load_results(path)
    assert state.done == {"a", "b"}
    assert dict(state.by_type) == {"succeeded": 1, "errored": 1}


@pytest.mark.parametrize("name", ["absent.jsonl", "empty.jsonl"])
def test_load_results_missing_or_empty(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "empty.jsonl":
        path.write_bytes(b"")
    state = load_results(path)
    assert state.done == set()
    assert sum(state.by_type.values()) == 0
    assert state.torn_bytes == 0


def test_load_results_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(jsonl(ok_line("a")) + b"\n  \n" + jsonl(ok_line("b")))
    assert load_results(path).done == {"a", "b"}


def test_load_results_repairs_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    good = jsonl(ok_line("a"), ok_line("b"))
    torn = orjson.dumps(ok_line("c"))[:40]
    path.write_bytes(good + torn)
    state = load_results(path)
    assert state.done == {"a", "b"}
    assert state.torn_bytes == len(torn)
    assert path.read_bytes() == good


@pytest.mark.parametrize(
    "garbled",
    [
        b"\0\0\0\0\0\0\n",
        b"{not json}\n",
        b'{"custom_id": "c"}\n',  # valid JSON, not a result line
        b'{"result": {"type": "succeeded"}}\n',
        b'{"custom_id": "c", "result": null}\n',
        b"[1, 2, 3]\n",
        b'"just a string"\n',
    ],
)
def test_load_results_drops_a_garbled_last_line(tmp_path: Path, garbled: bytes) -> None:
    path = tmp_path / "results.jsonl"
    good = jsonl(ok_line("a"), err_line("b"))
    path.write_bytes(good + garbled)
    state = load_results(path)
    assert state.done == {"a", "b"}
    assert state.torn_bytes == len(garbled)
    assert path.read_bytes() == good
    # After the repair the file is whole again.
    assert load_results(path).torn_bytes == 0


@pytest.mark.parametrize(
    "garbled",
    [b"\0\0\0\0\n", b"{not json}\n", b'{"custom_id": "c"}\n', b"[]\n"],
)
def test_load_results_garbled_middle_line_raises(tmp_path: Path, garbled: bytes) -> None:
    path = tmp_path / "results.jsonl"
    content = jsonl(ok_line("a")) + garbled + jsonl(ok_line("b"))
    path.write_bytes(content)
    with pytest.raises(ResultsFileError, match="line 2"):
        load_results(path)
    assert path.read_bytes() == content  # nothing is cut on a real corruption


# --------------------------------------------------------------------------- journal


@pytest.mark.parametrize(
    "record",
    [
        JournalRecord("img-001", "2c7f59ea-1", T + 0.123, 1, "fp1"),
        JournalRecord(
            "img-002",
            "2c7f59ea-2",
            T,
            3,
            "fp2",
            status_url="https://api.segmind.com/v2/requests/2c7f59ea-2/status",
            response_url="https://api.segmind.com/v2/requests/2c7f59ea-2",
        ),
        JournalRecord('ü-ñ "quoted"', "r", 0.0, 0, "", status_url="s"),
    ],
)
def test_journal_record_round_trip(record: JournalRecord) -> None:
    raw = record.to_json()
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    assert JournalRecord.from_json(raw) == record


def test_journal_record_wire_fields() -> None:
    raw = JournalRecord("a", "r1", T + 0.1234567, 2, "abc").to_json()
    assert orjson.loads(raw) == {
        "custom_id": "a",
        "request_id": "r1",
        "submitted_at": pytest.approx(T + 0.123),
        "attempt": 2,
        "fp": "abc",
    }


def test_journal_submitted_at_keeps_milliseconds() -> None:
    record = JournalRecord("a", "r1", T + 0.4567891, 1, "fp")
    again = JournalRecord.from_json(record.to_json())
    assert again.submitted_at == pytest.approx(T + 0.457, abs=1e-6)


def test_journal_path_for() -> None:
    assert journal_path_for(Path("/data/out.results.jsonl")) == Path(
        "/data/out.results.jsonl.journal"
    )


def write_journal(path: Path, *records: JournalRecord, tail: bytes = b"") -> bytes:
    content = b"".join(r.to_json() for r in records) + tail
    path.write_bytes(content)
    return content


def test_load_journal_keeps_latest_attempt(tmp_path: Path) -> None:
    path = tmp_path / "out.results.jsonl.journal"
    write_journal(
        path,
        JournalRecord("a", "ra1", T, 1, "fp"),
        JournalRecord("b", "rb1", T + 1, 1, "fp"),
        JournalRecord("a", "ra2", T + 100, 2, "fp"),
        JournalRecord("c", "rc3", T + 5, 3, "fp"),
        JournalRecord("c", "rc2", T + 2, 2, "fp"),  # an older attempt written later
    )
    latest, torn = load_journal(path)
    assert torn == 0
    assert {k: v.request_id for k, v in latest.items()} == {"a": "ra2", "b": "rb1", "c": "rc3"}
    assert latest["a"].submitted_at == T + 100


def test_load_journal_same_attempt_later_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "j"
    write_journal(
        path, JournalRecord("a", "first", T, 1, "fp"), JournalRecord("a", "second", T, 1, "fp")
    )
    latest, _ = load_journal(path)
    assert latest["a"].request_id == "second"


@pytest.mark.parametrize("name", ["absent", "empty"])
def test_load_journal_missing_or_empty(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "empty":
        path.write_bytes(b"")
    assert load_journal(path) == ({}, 0)


def test_load_journal_repairs_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j"
    torn = JournalRecord("b", "rb", T, 1, "fp").to_json()[:25]
    content = write_journal(path, JournalRecord("a", "ra", T, 1, "fp"), tail=torn)
    latest, torn_bytes = load_journal(path)
    assert set(latest) == {"a"}
    assert torn_bytes == len(torn)
    assert path.read_bytes() == content[: -len(torn)]


@pytest.mark.parametrize(
    "garbled",
    [
        b"\0\0\0\0\n",
        b'{"custom_id": "b"}\n',
        b'{"custom_id": "b", "request_id": "r", "submitted_at": 1, "attempt": "x", "fp": "f"}\n',
        b"[]\n",
    ],
)
def test_load_journal_drops_a_garbled_last_line(tmp_path: Path, garbled: bytes) -> None:
    path = tmp_path / "j"
    content = write_journal(path, JournalRecord("a", "ra", T, 1, "fp"), tail=garbled)
    latest, torn_bytes = load_journal(path)
    assert set(latest) == {"a"}
    assert torn_bytes == len(garbled)
    assert path.read_bytes() == content[: -len(garbled)]


def test_load_journal_garbled_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(
        JournalRecord("a", "ra", T, 1, "fp").to_json()
        + b"{broken\n"
        + JournalRecord("b", "rb", T, 1, "fp").to_json()
    )
    with pytest.raises(ResultsFileError, match="line 2"):
        load_journal(path)
