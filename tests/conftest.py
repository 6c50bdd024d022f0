"""Shared test fixtures: anyio's pytest plugin on a looptime event loop, so
waits on the loop's clock (latency, retention, rate windows) take no real time."""

from __future__ import annotations

from typing import Any

import looptime
import pytest


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"loop_factory": looptime.new_event_loop})
