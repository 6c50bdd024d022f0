"""Dataset readers for `batchrunner caption`: one module per format, one small
interface.

Every reader yields `Row`s in a stable order: the id a rerun resumes by, the
image as an image-block `source` (read only when the job is submitted), and
the row's other fields (for `--prompt-column` and `--prompt` templates).
Nothing here reads image pixels; a WebDataset reader reads each member's first
bytes, a Parquet reader reads the columns it needs, one row group at a time.

Image sources a reader may give (see `batchrunner.imagesource`):
- `{"type": "path", "path": P}`: a local file;
- `{"type": "path", "path": SHARD, "member": NAME, "offset": O, "length": N}`:
  a member of an uncompressed tar, read by its byte range;
- `{"type": "path", "path": FILE, "row": R, "column": C}`: a Parquet cell
  (binary, or a Hugging Face `Image` struct `{bytes, path}`);
- `{"type": "url", "url": U}`: fetched at submit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
URL_PREFIXES = ("http://", "https://")


@dataclass(slots=True)
class Row:
    """One image of a dataset; `error` instead of an image when the row cannot be one."""

    custom_id: str
    number: int
    """1-based position in the source (or the manifest's line), for messages."""
    image: dict[str, Any] | None
    fields: Mapping[str, Any]
    error: str | None = None


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.\-]*)\}")


def template_fields(prompt: str) -> list[str]:
    """The `{column}` names a prompt template uses (other braces are left as they are)."""
    return list(dict.fromkeys(_FIELD.findall(prompt)))


def fill_template(prompt: str, fields: Mapping[str, Any]) -> str:
    """The prompt with each `{column}` replaced by the row's value. Raises KeyError
    naming the first column the row lacks (or holds as null)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        found = fields.get(name)
        if found is None or (isinstance(found, str) and not found.strip()):
            raise KeyError(name)
        return found if isinstance(found, str) else str(found)

    return _FIELD.sub(value, prompt)


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(URL_PREFIXES)
