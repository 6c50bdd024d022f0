"""batchrunner: run large JSONL batches against the Segmind serverless API,
rate-limited, resumable and exactly-once.

    import batchrunner
    result = batchrunner.run_batch("jobs.jsonl", "jobs.results.jsonl", rpm=50)
"""

from batchrunner.batch import BatchResult, ResultStream, arun_batch, iter_results, run_batch
from batchrunner.errors import (
    AuthError,
    BatchrunnerError,
    ConfigError,
    JobsChangedError,
    ResultsFileError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BatchResult",
    "BatchrunnerError",
    "ConfigError",
    "JobsChangedError",
    "ResultStream",
    "ResultsFileError",
    "arun_batch",
    "iter_results",
    "run_batch",
]
