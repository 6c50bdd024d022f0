"""The exceptions batchrunner raises to its callers (the Python API and the CLI)."""

from __future__ import annotations


class BatchrunnerError(Exception):
    """Base of every error batchrunner raises on purpose."""


class ConfigError(BatchrunnerError):
    """A usage or configuration problem: bad option, unreadable file, no key (exit 2)."""


class JobsChangedError(ConfigError):
    """The jobs changed since the run that wrote the journal: results would mix."""


class ResultsFileError(BatchrunnerError):
    """The results file or journal is damaged beyond a torn last line (exit 2)."""


class AuthError(BatchrunnerError):
    """The API refused the account (401, 403, 406, unknown model): the run stopped
    and unfinished jobs stay resumable (exit 3)."""
