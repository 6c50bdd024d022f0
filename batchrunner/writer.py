"""Writer stage: the only owner of the results file and the journal.

Other stages hand it journal records and result lines (sync calls, same event
loop); it makes them durable by group commit: at most every `interval_s`, or
sooner when `batch` records are waiting. Each commit makes the journal durable
before any result line that depends on it reaches the results file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import anyio
import orjson

from batchrunner.journal import JournalRecord
from batchrunner.threads import run_blocking


class Writer:
    __slots__ = (
        "_batch",
        "_commits",
        "_interval_s",
        "_journal",
        "_journal_buffer",
        "_lock",
        "_on_result",
        "_pending",
        "_result_buffer",
        "_results",
        "_wake",
        "journal_path",
        "results_path",
    )

    def __init__(
        self,
        results_path: Path,
        journal_path: Path | None,
        *,
        interval_s: float = 0.1,
        batch: int = 256,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.results_path = results_path
        self.journal_path = journal_path
        self._interval_s = interval_s
        self._batch = batch
        self._on_result = on_result
        self._journal_buffer: list[bytes] = []
        self._result_buffer: list[bytes] = []
        self._results: IO[bytes] | None = None
        self._journal: IO[bytes] | None = None
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._pending = anyio.Event()
        self._commits = 0

    def open(self, *, truncate: bool = False) -> None:
        mode = "wb" if truncate else "ab"
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self._results = self.results_path.open(mode)
        if self.journal_path is not None:
            self._journal = self.journal_path.open(mode)

    def record_submission(self, record: JournalRecord) -> None:
        if self._journal is None:
            return
        self._journal_buffer.append(record.to_json())
        self._nudge()

    def write_result(self, line: dict[str, Any]) -> None:
        self._result_buffer.append(orjson.dumps(line) + b"\n")
        if self._on_result is not None:
            self._on_result(line)
        self._nudge()

    def _nudge(self) -> None:
        self._pending.set()
        # Only result lines count towards a full batch: a journal record
        # always precedes its job's result, so counting both would halve the
        # batch and double the fsyncs per job.
        if len(self._result_buffer) >= self._batch or len(self._journal_buffer) >= 4 * self._batch:
            self._wake.set()

    async def run(self) -> None:
        """Group-commit loop; runs until cancelled (the final commit is `aclose`).

        Idle, it sleeps until something is buffered; then it commits after
        `interval_s`, or at once when a full batch is waiting.
        """
        while True:
            await self._pending.wait()
            with anyio.move_on_after(self._interval_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._pending = anyio.Event()
            await self.commit()

    async def commit(self) -> None:
        async with self._lock:
            if not self._journal_buffer and not self._result_buffer:
                return
            journal_lines, self._journal_buffer = self._journal_buffer, []
            result_lines, self._result_buffer = self._result_buffer, []
            # fsync blocks for milliseconds: keep it off the event loop.
            await run_blocking(self._write_durably, journal_lines, result_lines)
            self._commits += 1

    def _write_durably(self, journal_lines: list[bytes], result_lines: list[bytes]) -> None:
        if journal_lines and self._journal is not None:
            self._journal.write(b"".join(journal_lines))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        if result_lines and self._results is not None:
            self._results.write(b"".join(result_lines))
            self._results.flush()
            os.fsync(self._results.fileno())

    async def aclose(self) -> None:
        """Final commit and close; shielded and time-bounded so a stop still flushes."""
        with anyio.move_on_after(10, shield=True):
            await self.commit()
        for handle in (self._journal, self._results):
            if handle is not None:
                handle.close()
        self._journal = self._results = None

    def statistics(self) -> dict[str, int]:
        return {
            "commits": self._commits,
            "pending_journal": len(self._journal_buffer),
            "pending_results": len(self._result_buffer),
        }
