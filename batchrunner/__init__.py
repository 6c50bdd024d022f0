"""batchrunner: run large JSONL batches against the Segmind serverless API,
rate-limited, resumable and exactly-once."""

__version__ = "0.1.0"
