"""Circuit breaker: tell an outage of the API from a job's own failures.

Nygard's circuit breaker (Release It!) with half-open probing:
- closed: requests go out; each answer is recorded as a transient failure
  (connection refused or dropped, timeout, 5xx) or not, with the job it was for;
- open: when most recent requests failed transiently, across several jobs,
  the API is down. No request goes out until the next probe time;
- half-open: at that time one request, whichever asks first, goes out as the
  probe. Any answer that is not a transient failure closes the breaker; a
  failure reopens it with a longer wait (exponential, capped, jittered).

While the breaker is open, failures are the API's, not the jobs': they are
not charged to any job's retry budget, so an outage never turns jobs into
`retries_exhausted`. A job whose own request keeps failing while others
succeed never opens it, and is charged as before.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import anyio


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window: int = 20
    """Recent answers looked at."""
    min_failures: int = 6
    failure_ratio: float = 0.6
    min_jobs: int = 2
    """Failures must span this many jobs: one job failing alone is that job's problem."""
    first_probe_s: float = 2.0
    max_probe_s: float = 60.0
    growth: float = 2.0
    jitter: float = 0.1


def outage_detected(recent: Iterable[tuple[bool, Hashable]], policy: BreakerPolicy) -> bool:
    """Whether recent answers ((failed, job) pairs, oldest first) say the API is down."""
    answers = list(recent)
    failed_jobs = [job for failed, job in answers if failed]
    return (
        len(failed_jobs) >= policy.min_failures
        and len(failed_jobs) >= policy.failure_ratio * len(answers)
        and len(set(failed_jobs)) >= policy.min_jobs
    )


def probe_delay(failed_probes: int, policy: BreakerPolicy, rng: random.Random) -> float:
    """Seconds until the next probe after `failed_probes` failed ones (0 when it opens)."""
    base = min(policy.max_probe_s, policy.first_probe_s * policy.growth ** min(failed_probes, 32))
    return base * (1.0 + rng.uniform(-policy.jitter, policy.jitter))


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    __slots__ = (
        "_changed",
        "_clock",
        "_failed_probes",
        "_policy",
        "_recent",
        "_rng",
        "next_probe_at",
        "opened_at",
        "outages",
        "state",
    )

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        policy: BreakerPolicy | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._policy = policy or BreakerPolicy()
        self._recent: deque[tuple[bool, Hashable]] = deque(maxlen=self._policy.window)
        self._changed = anyio.Event()
        self._failed_probes = 0
        self.state = State.CLOSED
        self.opened_at: float | None = None
        """Epoch seconds the current outage began (None while closed)."""
        self.next_probe_at: float | None = None
        self.outages = 0

    @property
    def is_open(self) -> bool:
        return self.state is not State.CLOSED

    def open_for(self, now: float) -> float:
        """Seconds the API has been unreachable (0 while closed)."""
        return 0.0 if self.opened_at is None else now - self.opened_at

    async def wait_turn(self) -> bool:
        """Wait until a request may go out. True: it is the probe, and its answer
        must be recorded with `probe=True` (or `abandon_probe` if it never went)."""
        while True:
            if self.state is State.CLOSED:
                return False
            now = self._clock()
            changed = self._changed
            if self.state is State.OPEN:
                assert self.next_probe_at is not None
                if now >= self.next_probe_at:
                    self.state = State.HALF_OPEN
                    return True
                with anyio.move_on_after(self.next_probe_at - now):
                    await changed.wait()
            else:  # half-open: a probe is out; wait for its answer
                await changed.wait()

    def record(self, failed: bool, job: Hashable, *, probe: bool = False) -> None:
        """One answer: `failed` when it was a transient failure."""
        if not failed:
            self._recent.append((False, job))
            if self.state is not State.CLOSED:
                self._close()
            return
        now = self._clock()
        self._recent.append((True, job))
        if self.state is State.CLOSED:
            if outage_detected(self._recent, self._policy):
                self.outages += 1
                self.opened_at = now
                self._reopen(now)
        elif probe:
            self._failed_probes += 1
            self._reopen(now)

    def abandon_probe(self) -> None:
        """The probe was cancelled before it had an answer: let another go."""
        if self.state is State.HALF_OPEN:
            self.state = State.OPEN
            self.next_probe_at = self._clock()
            self._notify()

    def statistics(self) -> dict[str, float | str | None]:
        return {
            "state": self.state.value,
            "opened_at": self.opened_at,
            "next_probe_at": self.next_probe_at,
            "outages": self.outages,
        }

    def _reopen(self, now: float) -> None:
        self.state = State.OPEN
        self.next_probe_at = now + probe_delay(self._failed_probes, self._policy, self._rng)
        self._notify()

    def _close(self) -> None:
        self.state = State.CLOSED
        self.opened_at = self.next_probe_at = None
        self._failed_probes = 0
        # The failures that opened it are history: a fresh window after an outage.
        self._recent.clear()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
