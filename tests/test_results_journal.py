"""Result lines, torn-tail repair, loading an existing results file, and the journal."""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchrunner.errors import ResultsFileError
from batchrunner.journal import JournalRecord, journal_path_for, load_journal
from batchrunner.jsonl import is_torn_write
from batchrunner.results import errored, expired, iso_utc, result_line, succeeded
from batchrunner.resultsfile import load_prior

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


def test_iso_utc_agrees_with_datetime_across_seconds_and_rounding_edges() -> None:
    """The per-second cache must not change a stamp: datetime's own rounding to
    the microsecond decides the second, here and in isoformat alike."""
    rng = random.Random(12)
    edges = [0.9999995, 0.9999994, 0.0000005, 0.4999995, 0.0]
    for _ in range(20_000):
        epoch = rng.randrange(-(10**9), 4 * 10**9) + rng.choice([*edges, rng.random()])
        expected = datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
        assert iso_utc(epoch) == expected.removesuffix("+00:00") + "Z", epoch


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


# --------------------------------------------------------------------------- torn tails


@pytest.mark.parametrize(
    ("fragment", "torn"),
    [
        (b'{"custom_id":"a","res', True),  # our line, cut short
        (b'{"custom_id":"a","result":{"type":"succ', True),
        (b'{"custom_id":"a \\" b",', True),  # an escaped quote in the id
        (b'{"custom_id":"a', True),
        (b'{"custom_id":', True),
        (b'{"cus', True),  # shorter than the start of a line
        (b"{", True),
        (b"\0\0\0\0", True),  # a power loss left zeros
        (b"", True),
        (b"sg_0123456789abcdef", False),  # a key file without its newline
        (b'{"messages": [{"role": "user"', False),  # a jobs line
        (b'{"custom_id":"j1","messages":[{"role"', False),  # a jobs line written by orjson
        (b'{"custom_id": "j1", "result"', False),  # not how batchrunner writes
        (b"hello", False),
    ],
)
def test_is_torn_write(fragment: bytes, torn: bool) -> None:
    assert is_torn_write(fragment, b'"result":') is torn


# --------------------------------------------------------------------------- load_prior


def test_load_prior_outcomes_and_tokens(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    content = jsonl(ok_line("a"), err_line("b"), ok_line("c"), exp_line("d"), ok_line("e"))
    path.write_bytes(content)
    prior = load_prior(path)
    assert len(prior) == 5
    assert dict(prior.result_types()) == {"succeeded": 3, "errored": 1, "expired": 1}
    assert (prior.input_tokens, prior.output_tokens) == (3 * 56, 3 * 31)
    line = prior.get("b")
    assert line is not None and line.outcome == "invalid_job"
    assert prior.get("zz") is None
    assert path.read_bytes() == content


def test_load_prior_latest_line_of_an_id_wins(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(jsonl(err_line("a"), ok_line("a"), err_line("b")))
    prior = load_prior(path)
    assert prior.duplicates == 1
    assert dict(prior.result_types()) == {"succeeded": 1, "errored": 1}
    line = prior.get("a")
    assert line is not None and line.outcome == "succeeded"


def test_load_prior_keeps_a_prefix_of_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    fingerprint = "0123456789abcdef01234567"
    line = result_line("a", succeeded(MESSAGE), finished_at=T, fingerprint=fingerprint)
    path.write_bytes(jsonl(line, ok_line("b")))
    prior = load_prior(path)
    a, b = prior.get("a"), prior.get("b")
    assert a is not None and fingerprint.startswith(a.fingerprint or "-")
    assert b is not None and b.fingerprint is None  # written before lines had one


@pytest.mark.parametrize("name", ["absent.jsonl", "empty.jsonl"])
def test_load_prior_missing_or_empty(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "empty.jsonl":
        path.write_bytes(b"")
    assert len(load_prior(path)) == 0


def test_load_prior_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(jsonl(ok_line("a")) + b"\n  \n" + jsonl(ok_line("b")))
    assert len(load_prior(path)) == 2


@pytest.mark.parametrize("torn", [b'{"custom_id":"c","result":{"ty', b"\0\0\0", b"{"])
def test_load_prior_cuts_a_torn_tail(tmp_path: Path, torn: bytes) -> None:
    path = tmp_path / "results.jsonl"
    good = jsonl(ok_line("a"), ok_line("b"))
    path.write_bytes(good + torn)
    assert len(load_prior(path)) == 2
    assert path.read_bytes() == good


def test_load_prior_cuts_zeros_a_power_loss_left(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    good = jsonl(ok_line("a"))
    path.write_bytes(good + b"\0\0\0\0\0\0\n\0\0\0")
    assert len(load_prior(path)) == 1
    assert path.read_bytes() == good


def test_load_prior_without_repair_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    content = jsonl(ok_line("a")) + b'{"custom_id":"b","res'
    path.write_bytes(content)
    assert len(load_prior(path, repair=False)) == 1
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "foreign",
    [
        b"{not json}\n",
        b'{"custom_id": "c"}\n',  # valid JSON, not a result line
        b'{"result": {"type": "succeeded"}}\n',
        b'{"custom_id": "c", "result": null}\n',
        b"[1, 2, 3]\n",
        b'"just a string"\n',
        b'{"custom_id": "j1", "messages": [{"role": "user", "content": "hi"}]}',  # no newline
        b"sg_0123456789abcdef",  # a key file
    ],
)
@pytest.mark.parametrize("before", [b"", b"ours"])
def test_load_prior_refuses_a_file_that_is_not_ours_and_leaves_it(
    tmp_path: Path, foreign: bytes, before: bytes
) -> None:
    path = tmp_path / "results.jsonl"
    content = (jsonl(ok_line("a"), err_line("b")) if before else b"") + foreign
    path.write_bytes(content)
    with pytest.raises(ResultsFileError, match="not a batchrunner results file"):
        load_prior(path)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "garbled",
    [b"\0\0\0\0\n", b"{not json}\n", b'{"custom_id": "c"}\n', b"[]\n"],
)
def test_load_prior_garbled_middle_line_raises(tmp_path: Path, garbled: bytes) -> None:
    path = tmp_path / "results.jsonl"
    content = jsonl(ok_line("a")) + garbled + jsonl(ok_line("b"))
    path.write_bytes(content)
    with pytest.raises(ResultsFileError, match="line 2"):
        load_prior(path)
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


def test_load_journal_latest_record_in_file_order_wins(tmp_path: Path) -> None:
    path = tmp_path / "out.results.jsonl.journal"
    write_journal(
        path,
        JournalRecord("a", "ra1", T, 1, "fp"),
        JournalRecord("b", "rb1", T + 1, 1, "fp"),
        JournalRecord("a", "ra2", T + 100, 2, "fp"),
        JournalRecord("c", "rc3", T + 5, 3, "fp"),
        JournalRecord("c", "rc1", T + 200, 1, "fp"),  # a rerun: the file is chronological
    )
    latest = load_journal(path)
    assert {k: v.request_id for k, v in latest.items()} == {"a": "ra2", "b": "rb1", "c": "rc1"}
    assert latest["a"].submitted_at == T + 100


def test_load_journal_keep_drops_records_and_a_dropped_latest_hides_older(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j"
    write_journal(
        path,
        JournalRecord("a", "old", T, 1, "fp-old"),
        JournalRecord("a", "new", T + 1, 2, "fp-new"),
        JournalRecord("b", "rb", T, 1, "fp-old"),
    )
    latest = load_journal(path, keep=lambda record: record.fingerprint != "fp-new")
    assert {k: v.request_id for k, v in latest.items()} == {"b": "rb"}


@pytest.mark.parametrize("name", ["absent", "empty"])
def test_load_journal_missing_or_empty(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "empty":
        path.write_bytes(b"")
    assert load_journal(path) == {}


def test_load_journal_repairs_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j"
    torn = JournalRecord("b", "rb", T, 1, "fp").to_json()[:25]
    assert torn.startswith(b'{"custom_id":"b","req')
    content = write_journal(path, JournalRecord("a", "ra", T, 1, "fp"), tail=torn)
    latest = load_journal(path)
    assert set(latest) == {"a"}
    assert path.read_bytes() == content[: -len(torn)]


def test_load_journal_drops_zeros_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "j"
    content = write_journal(path, JournalRecord("a", "ra", T, 1, "fp"), tail=b"\0\0\0\n\0\0")
    assert set(load_journal(path)) == {"a"}
    assert path.read_bytes() == content[: -len(b"\0\0\0\n\0\0")]


@pytest.mark.parametrize(
    "garbled",
    [
        b'{"custom_id": "b"}\n',
        b'{"custom_id": "b", "request_id": "r", "submitted_at": 1, "attempt": "x", "fp": "f"}\n',
        b"[]\n",
        b"sg_key_file",
    ],
)
def test_load_journal_refuses_a_line_that_is_not_a_record(tmp_path: Path, garbled: bytes) -> None:
    path = tmp_path / "j"
    content = write_journal(path, JournalRecord("a", "ra", T, 1, "fp"), tail=garbled)
    with pytest.raises(ResultsFileError, match="line 2 is not a journal record"):
        load_journal(path)
    assert path.read_bytes() == content


def test_load_journal_garbled_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(
        JournalRecord("a", "ra", T, 1, "fp").to_json()
        + b"{broken\n"
        + JournalRecord("b", "rb", T, 1, "fp").to_json()
    )
    with pytest.raises(ResultsFileError, match="line 2"):
        load_journal(path)
