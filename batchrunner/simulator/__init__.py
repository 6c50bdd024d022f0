"""A faithful in-process simulator of the Segmind v2 serverless API, for tests,
benchmarks and ``batchrunner --simulate``; ``python -m batchrunner.simulator``
runs it standalone."""

from batchrunner.simulator.server import (
    PayloadError,
    RequestStats,
    SimConfig,
    SimStats,
    Simulator,
    run_simulator,
    validate_payload,
)

__all__ = [
    "PayloadError",
    "RequestStats",
    "SimConfig",
    "SimStats",
    "Simulator",
    "run_simulator",
    "validate_payload",
]
