"""Opt-in response cache: succeeded messages stored by the hash of what was asked.

The key is a hash of the model and the canonical request body as sent, so
images count by their content (the base64 is in the body), not their path.
Entries are files written atomically (temporary file, then `os.replace`), so
concurrent runs sharing a folder never see half an entry; the last writer of
the same key wins with an identical value.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson


def cache_key(model: str, body: dict[str, Any]) -> str:
    canonical = orjson.dumps({"model": model, "body": body}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    __slots__ = ("hits", "max_age_s", "root", "stores")

    def __init__(self, root: Path, max_age_s: float | None = None) -> None:
        self.root = root
        self.max_age_s = max_age_s
        self.hits = 0
        self.stores = 0
        root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.root)!r}, max_age_s={self.max_age_s})"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        """The cached message, or None when absent, unreadable or older than max_age_s."""
        path = self._path(key)
        try:
            entry = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError, OSError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("message"), dict):
            return None
        if self.max_age_s is not None:
            age = (now if now is not None else time.time()) - float(entry.get("stored_at", 0))
            if age > self.max_age_s:
                # Aged out: drop it so the folder does not grow with dead entries.
                path.unlink(missing_ok=True)
                return None
        self.hits += 1
        return entry["message"]

    def put(self, key: str, message: dict[str, Any], now: float | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        data = orjson.dumps(
            {"stored_at": now if now is not None else time.time(), "message": message}
        )
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.stores += 1
