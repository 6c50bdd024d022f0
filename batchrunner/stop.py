"""Stop controller: the one place that decides when a run stops taking jobs,
when it stops collecting them, and with which exit code.

A run is a small state machine:

    running --drain(reason)--> draining --stop_now()--> stopped

- running: the reader feeds jobs, submits go out, polls collect.
- draining: no new submit starts (the reader and every wait for a submit token
  are cancelled); requests already accepted are still collected.
- stopped: collecting stops too (every wait for a poll is cancelled).

What is never cancelled by a stop is a request that has been *sent*: a submit
in the air may be accepted by the server, and must be journaled or its job is
paid for twice on resume. Such a submit runs in a shielded scope registered
here; it ends on its own (bounded by the HTTP timeout), and only `force()` (a
third Ctrl-C) abandons it.

Stages never read flags: they run inside scopes handed out by `scope(...)`,
ask `taking_jobs`, and report what they saw with `drain` or `stop_now`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import anyio


class Phase(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Reason(enum.Enum):
    """Why a run stopped early."""

    INTERRUPTED = "interrupted"  # SIGINT / SIGTERM
    CALLER = "stopped by the caller"  # should_stop, or iter_results left early
    ACCOUNT = "the API refused the account"  # 401, 403, 406
    RETRY_AFTER = "the API asked to wait too long"  # Retry-After over --max-retry-after
    OUTAGE = "the API stayed unreachable"  # past --max-outage, nothing left to collect
    JOBS_CHANGED = "the jobs file changed under the run"
    COST_CAP = "the --max-cost cap was reached"
    FILE_ERROR = "a file could not be written"


EXIT_CODES = {
    Reason.INTERRUPTED: 130,
    Reason.CALLER: 130,
    Reason.ACCOUNT: 3,
    Reason.RETRY_AFTER: 3,
    Reason.OUTAGE: 3,
    Reason.JOBS_CHANGED: 2,
    Reason.COST_CAP: 1,
    Reason.FILE_ERROR: 2,
}
"""DESIGN.md section 1."""


@dataclass(frozen=True, slots=True)
class Stop:
    reason: Reason
    message: str | None = None


class Level(enum.Enum):
    """What a scope protects, by which transition cancels it."""

    INTAKE = "intake"  # cancelled on drain: reading jobs, waiting to submit
    COLLECT = "collect"  # cancelled on stop: polling, fetching, everything but requests sent


class StopController:
    __slots__ = (
        "_grace_deadline",
        "_in_air",
        "_scope_class",
        "_scopes",
        "abandoned",
        "interrupts",
        "phase",
        "stop",
    )

    def __init__(self) -> None:
        self.phase = Phase.RUNNING
        self.stop: Stop | None = None
        """The first reason to stop; it decides the exit code."""
        self.interrupts = 0
        self.abandoned = 0
        """Submits in the air that a third Ctrl-C abandoned (a resume may pay for them again)."""
        self._scopes: dict[Level, set[anyio.CancelScope]] = {level: set() for level in Level}
        self._in_air: set[anyio.CancelScope] = set()
        self._scope_class: type[anyio.CancelScope] | None = None
        self._grace_deadline: float | None = None

    # --- what stages ask -------------------------------------------------------

    @property
    def taking_jobs(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def collecting(self) -> bool:
        return self.phase is not Phase.STOPPED

    @property
    def submits_in_air(self) -> int:
        return len(self._in_air)

    @contextmanager
    def scope(self, level: Level) -> Iterator[anyio.CancelScope]:
        """A cancel scope that the transition of `level` cancels (at once when it
        already happened). Leaving it by that cancellation is a normal return."""
        scope = anyio.CancelScope()
        if self._cancelled(level):
            scope.cancel()
        self._scopes[level].add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes[level].discard(scope)

    def request_in_air(self) -> _InAir:
        """Shield a request that is being sent: no stop cancels it, `force` does
        (then the scope's `cancel_called` is set and the request had no answer).
        Entering it gives the scope."""
        # Every submit passes here. `anyio.CancelScope()` looks the backend up
        # and runs the backend scope's __init__ twice (its __new__ returns an
        # instance of a subclass); the backend's class, once known, builds one
        # directly: a third of the shield's cost in issue 12's bytecode count.
        if self._scope_class is None:
            scope = anyio.CancelScope(shield=True)
            self._scope_class = type(scope)
        else:
            scope = self._scope_class(shield=True)
        return _InAir(scope, self._in_air)

    # --- transitions --------------------------------------------------------------

    def drain(self, reason: Reason, message: str | None = None) -> None:
        """Stop taking jobs; keep collecting what was accepted."""
        if self.stop is None:
            self.stop = Stop(reason, message)
        if self.phase is Phase.RUNNING:
            self.phase = Phase.DRAINING
            self._cancel(Level.INTAKE)

    def stop_now(self, reason: Reason, message: str | None = None) -> None:
        """Stop collecting too (the journal keeps what is unfinished for a resume)."""
        self.drain(reason, message)
        if self.phase is not Phase.STOPPED:
            self.phase = Phase.STOPPED
            self._cancel(Level.COLLECT)

    def collect_until(self, deadline: float) -> None:
        """Keep collecting until `deadline` (the grace period); `check_grace` then stops."""
        if self._grace_deadline is None or deadline < self._grace_deadline:
            self._grace_deadline = deadline

    def check_grace(self, now: float) -> bool:
        """Stop collecting once the grace period is over; True when that happens now."""
        if self._grace_deadline is None or now < self._grace_deadline:
            return False
        if self.phase is Phase.STOPPED:
            return False
        self.stop_now(Reason.INTERRUPTED if self.stop is None else self.stop.reason)
        return True

    def force(self) -> None:
        """Abandon the submits in the air (a third Ctrl-C)."""
        self.abandoned += len(self._in_air)
        for scope in list(self._in_air):
            scope.cancel()

    def interrupt(self, grace_s: float, now: float) -> int:
        """One SIGINT/SIGTERM: the first drains with a grace period, the second
        stops collecting, the third abandons submits in the air. Returns which one."""
        self.interrupts += 1
        if self.interrupts == 1:
            self.drain(Reason.INTERRUPTED)
            self.collect_until(now + grace_s)
        elif self.interrupts == 2:
            self.stop_now(Reason.INTERRUPTED)
        else:
            self.force()
        return self.interrupts

    # --- the end --------------------------------------------------------------------

    def exit_code(self, *, all_succeeded: bool) -> int:
        if self.stop is not None:
            return EXIT_CODES[self.stop.reason]
        return 0 if all_succeeded else 1

    def _cancelled(self, level: Level) -> bool:
        if level is Level.INTAKE:
            return self.phase is not Phase.RUNNING
        return self.phase is Phase.STOPPED

    def _cancel(self, level: Level) -> None:
        for scope in self._scopes[level]:
            scope.cancel()


class _InAir:
    """`request_in_air`'s context manager: the shielded scope, registered while
    entered (a class, not a generator context manager: it is one per submit)."""

    __slots__ = ("_registry", "_scope")

    def __init__(self, scope: anyio.CancelScope, registry: set[anyio.CancelScope]) -> None:
        self._scope = scope
        self._registry = registry

    def __enter__(self) -> anyio.CancelScope:
        self._scope.__enter__()
        self._registry.add(self._scope)
        return self._scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:  # as a generator context manager's: mypy then reads on after it
        self._registry.discard(self._scope)
        return self._scope.__exit__(exc_type, exc, tb)
