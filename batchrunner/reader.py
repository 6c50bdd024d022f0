"""Reader stage: stream job lines, validate them, name the line and field of every error.

Accepted shapes (DESIGN.md section 2), converted here, at read time, to the
Segmind body and then validated alike:
- Segmind native: every key but `custom_id` and `model` is the request body;
- Anthropic Message Batches: `params`, with `system` becoming `instruction`;
- OpenAI Batch: `method`, `url` and a chat-completions `body` (see
  `_from_openai` for what each field becomes, and what is refused).
Anthropic model ids of a model Segmind serves become its slug (`models`).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson

from batchrunner.digests import DigestSet
from batchrunner.images import (
    ACCEPTED_MEDIA_TYPES,
    FORMAT_NAMES,
    MAX_IMAGE_BYTES,
    SNIFF_BYTES,
    ImageError,
    image_blocks,
    max_side_of,
    other_format,
    sniff_media_type,
)
from batchrunner.jsonl import count_lines
from batchrunner.models import LIMITS, segmind_slug

MAX_CUSTOM_ID_CHARS = 512
MAX_IMAGE_URL_CHARS = 8192
"""Longer image URLs are refused: servers commonly refuse past 8 KB of request line."""

_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
"""Characters strict base64 (`b64decode(validate=True)`) refuses."""


@dataclass(frozen=True, slots=True)
class Job:
    """A valid job. `body` may still name local image files (resolved at submit)."""

    custom_id: str
    line: int
    model: str
    body: dict[str, Any]
    fingerprint: str  # identifies model + request body, to notice an edited jobs file
    model_alias: str | None = None
    """The model id the line gave, when it was mapped to `model` (an Anthropic id)."""


@dataclass(frozen=True, slots=True)
class InvalidJob:
    """A line rejected locally; it becomes an `invalid_job` result."""

    custom_id: str
    line: int
    message: str
    fingerprint: str
    """Identifies the rejected input (see `digest`): the line's bytes for a jobs
    file line, so a later run can tell whether the line was edited."""

    @classmethod
    def of_message(cls, custom_id: str, line: int, message: str) -> InvalidJob:
        """One whose fingerprint is its message's (no jobs line of its own: caption)."""
        return cls(custom_id, line, message, digest(message.encode()))


class JobError(ValueError):
    """A job line fails validation; the message names the field."""


class JobsFileChanged(Exception):
    """The jobs file changed while a run was reading it: lines read from here on
    could splice two versions, and a job would get another's answer."""


def read_jobs(path: Path, default_model: str, *, watch: bool = False) -> Iterator[Job | InvalidJob]:
    """Stream the jobs of a JSONL file, one at a time, in file order.

    With `watch`, raise JobsFileChanged as soon as the file is not the one the
    read began with (its inode, size or modification time moved).
    """
    expected = count_lines(path)
    with path.open("rb") as handle:
        lines: Iterable[bytes] = handle
        if watch:
            lines = unchanged_lines(handle, path)
        yield from parse_job_lines(lines, default_model, expected)


def count_job_lines(path: Path) -> int:
    """Lines that are jobs (blank lines, and a lone byte order mark, are not)."""
    count = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            if number == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if line.strip():
                count += 1
    return count


def unchanged_lines(handle: BinaryIO, path: Path) -> Iterator[bytes]:
    """The file's lines from the handle's position on, each from a chunk read
    while the file stayed as it was.

    The file is checked after every read: unchanged then means unchanged
    during the read, so a line never joins bytes of two versions.
    """
    started = _identity(path)
    rest = b""
    while True:
        chunk = handle.read(1 << 16)
        if _identity(path) != started:
            raise JobsFileChanged(
                f"the jobs file {path} changed during the run (edited, replaced or "
                "truncated): stopped taking jobs from it; what was submitted is collected. "
                "Run the same command again to run the new version"
            )
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _identity(path: Path) -> tuple[int, int, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0, -1, 0)  # gone: unlike any file's identity
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def parse_job_lines(
    lines: Iterable[bytes | str], default_model: str, expected: int = 0, *, start: int = 1
) -> Iterator[Job | InvalidJob]:
    """Jobs of JSONL lines; `expected` (how many lines there are) sizes the
    duplicate check once instead of growing it. `start`: the line number of
    the first line (a shard of a file starts further in)."""
    # 8-byte digests in a compact table, not the ids themselves: ~11 bytes a
    # line; a false duplicate needs a 64-bit collision (~1e-8 at 1e6 ids).
    seen = DigestSet(expected)
    for number, raw in enumerate(lines, start=start):
        if number == 1:
            raw = _without_bom(raw)
        if not raw.strip():
            continue
        item = parse_job_line(raw, number, default_model)
        if not seen.add(item.custom_id):
            message = (
                f"line {number}: custom_id: duplicate {item.custom_id!r} (an earlier line has it)"
            )
            # The first holder of the id keeps it; this line's result would
            # collide with it, so report it under an id no other line has.
            unique = f"{item.custom_id}#line-{number}"
            while not seen.add(unique):
                unique += "#dup"
            item = InvalidJob(unique, number, message, line_fingerprint(raw))
        yield item


def digest(data: bytes) -> str:
    """The fingerprint of some bytes: 24 hex digits of blake2b."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def line_fingerprint(raw: bytes | str) -> str:
    """An invalid line's fingerprint: its bytes without the line ending (so that
    appending a line after a last line that had none does not change it)."""
    data = raw.encode() if isinstance(raw, str) else raw
    return digest(data.rstrip(b"\r\n"))


def _without_bom(raw: bytes | str) -> bytes | str:
    """Line 1 without a UTF-8 byte order mark (some editors on Windows write one)."""
    if isinstance(raw, bytes):
        return raw.removeprefix(b"\xef\xbb\xbf")
    return raw.removeprefix("\ufeff")


def parse_job_line(raw: bytes | str, number: int, default_model: str) -> Job | InvalidJob:
    fallback_id = f"line-{number}"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = f"line {number}: not valid JSON ({exc})"
        return InvalidJob(fallback_id, number, message, line_fingerprint(raw))
    if not isinstance(data, dict):
        message = f"line {number}: a job must be a JSON object, got {_kind(data)}"
        return InvalidJob(fallback_id, number, message, line_fingerprint(raw))
    custom_id = data.get("custom_id", fallback_id)
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        message = (
            f"line {number}: custom_id: must be a non-empty string of at most "
            f"{MAX_CUSTOM_ID_CHARS} characters"
        )
        return InvalidJob(fallback_id, number, message, line_fingerprint(raw))
    try:
        split = _split_job(data, default_model)
        validate_body(split.body, split.model, split.names)
    except JobError as exc:
        return InvalidJob(custom_id, number, f"line {number}: {exc}", line_fingerprint(raw))
    return Job(
        custom_id,
        number,
        split.model,
        split.body,
        fingerprint(split.model, split.body),
        split.alias,
    )


def fingerprint(model: str, body: dict[str, Any]) -> str:
    canonical = orjson.dumps({"model": model, "body": body}, option=orjson.OPT_SORT_KEYS)
    return digest(canonical)


@dataclass(frozen=True, slots=True)
class FieldNames:
    """How errors name the fields of a body converted from a line: as the line
    wrote them (`body.max_completion_tokens`, `body.messages[2]` for the
    second message once a system message was taken out)."""

    prefix: str = ""
    renamed: dict[str, str] | None = None
    """Body key -> the line's key, where they differ."""
    message_index: list[int] | None = None
    """The line's index of each message of the body."""

    def top(self, key: str) -> str:
        return self.prefix + (self.renamed or {}).get(key, key)

    def message(self, index: int) -> str:
        original = self.message_index[index] if self.message_index is not None else index
        return f"{self.top('messages')}[{original}]"


NATIVE_NAMES = FieldNames()


class _Split(NamedTuple):
    model: str
    body: dict[str, Any]
    names: FieldNames = NATIVE_NAMES
    alias: str | None = None


def _split_job(data: dict[str, Any], default_model: str) -> _Split:
    names = NATIVE_NAMES
    if "params" in data:
        params = data["params"]
        if not isinstance(params, dict):
            raise JobError(f"params: must be an object, got {_kind(params)}")
        extra = sorted(set(data) - {"custom_id", "params"})
        if extra:
            raise JobError(f"{extra[0]}: unexpected beside params (Anthropic batch shape)")
        body = {k: v for k, v in params.items() if k not in ("model", "system")}
        if "system" in params:
            body["instruction"] = _system_text(params["system"])
        model = params.get("model", default_model)
        field = "params.model"
    elif "body" in data:
        model, body, names = _from_openai(data, default_model)
        field = "body.model"
    else:
        body = {k: v for k, v in data.items() if k not in ("custom_id", "model")}
        model = data.get("model", default_model)
        field = "model"
    if not isinstance(model, str) or not model or "/" in model:
        raise JobError(f"{field}: must be a model slug like 'claude-3.5-sonnet'")
    slug = segmind_slug(model)
    return _Split(slug, body, names, model if slug != model else None)


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        return "\n\n".join(b["text"] for b in system)
    raise JobError("params.system: must be a string or a list of text blocks")


# --------------------------------------------------------------------------- OpenAI Batch lines

OPENAI_CHAT_URL = "/v1/chat/completions"
OPENAI_KEYS_DROPPED = frozenset({"user", "metadata", "store"})
"""Bookkeeping for OpenAI that does not change an answer: left out."""
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,", re.IGNORECASE)


def _from_openai(
    data: dict[str, Any], default_model: str
) -> tuple[Any, dict[str, Any], FieldNames]:
    """(model, Segmind body, field names) of an OpenAI Batch request line.

    - `method` must be POST and `url` /v1/chat/completions (when given).
    - `body.model` is the job's model (an Anthropic id of a Segmind model is
      mapped, like anywhere); without it, --model.
    - system and developer messages become `instruction` (joined by a blank
      line), user and assistant messages pass; text parts pass through;
      `image_url` parts become image blocks: a `data:` URL inline (checked like
      base64 data), an http(s) URL fetched at submit (`detail` has no Claude
      equivalent and is left out).
    - `max_tokens` (or `max_completion_tokens`) and `temperature` keep their
      meaning and their checks (temperature 0 to 1: Claude's range, not
      rescaled from OpenAI's 0 to 2).
    - `stop` is refused: the model page on Segmind documents no stop sequences
      (only messages and instruction), so it could not keep its meaning.
    - `n` must be 1; `user`, `metadata`, `store` are left out; any other key
      (tools, response_format, top_p, ...) is refused, naming it.
    """
    extra = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if extra:
        raise JobError(
            f"{extra[0]}: unexpected in an OpenAI batch line (custom_id, method, url, body)"
        )
    if data.get("method", "POST") != "POST":
        raise JobError(f"method: must be 'POST', got {data['method']!r}")
    if data.get("url", OPENAI_CHAT_URL) != OPENAI_CHAT_URL:
        raise JobError(
            f"url: batchrunner runs chat completions: must be {OPENAI_CHAT_URL!r}, "
            f"got {data['url']!r}"
        )
    source = data["body"]
    if not isinstance(source, dict):
        raise JobError(f"body: must be an object, got {_kind(source)}")
    chat = openai_chat_body(source, default_model, prefix="body.")
    return chat.model, chat.body, chat.names


@dataclass(frozen=True, slots=True)
class ChatBody:
    """A chat-completions request converted to a Segmind body (not yet validated)."""

    model: Any
    body: dict[str, Any]
    names: FieldNames
    local: dict[str, Any]
    """The keys of `keep` the request gave, for the caller to apply (serve: stop, seed, stream)."""


OPENAI_NEUTRAL = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
"""OpenAI parameters that, at these values, change nothing: accepted and left out
(eval tools send them explicitly)."""


def _is_neutral(key: str, value: Any) -> bool:
    if key not in OPENAI_NEUTRAL:
        return False
    neutral = OPENAI_NEUTRAL[key]
    return value is None or (
        value == neutral and isinstance(value, bool) == isinstance(neutral, bool)
    )


def openai_chat_body(
    source: dict[str, Any],
    default_model: str,
    *,
    prefix: str,
    keep: frozenset[str] = frozenset(),
) -> ChatBody:
    """Convert an OpenAI chat-completions body (see `_from_openai` for what each
    field becomes); `prefix` starts the field names of its errors, and the keys
    of `keep` are handed back in `local` instead of converted or refused."""
    body: dict[str, Any] = {}
    local: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for key, value in source.items():
        if key in ("model", "messages") or key in OPENAI_KEYS_DROPPED:
            continue
        if key in keep:
            local[key] = value
        elif key in ("max_tokens", "max_completion_tokens"):
            if "max_tokens" in body:
                raise JobError(f"{prefix}{key}: give max_tokens or max_completion_tokens, not both")
            body["max_tokens"] = value
            renamed["max_tokens"] = key
        elif key in ("temperature", "stream"):
            body[key] = value  # checked with the body, as body.temperature, body.stream
        elif key == "n":
            if value != 1:
                raise JobError(f"{prefix}n: batchrunner asks for one answer per job, got {value!r}")
        elif _is_neutral(key, value):
            continue
        elif key == "stop":
            raise JobError(
                f"{prefix}stop: claude-3.5-sonnet on Segmind documents no stop sequences (its "
                "model page lists messages and instruction only), so a stop could not keep its "
                "meaning; remove it"
            )
        else:
            raise JobError(
                f"{prefix}{key}: not supported when running on Segmind's Claude (a chat body "
                "may have model, messages, max_tokens or max_completion_tokens, temperature, n: "
                "1, user, metadata, store); remove it"
            )
    messages, instruction, index = _openai_messages(source.get("messages"), prefix)
    if messages is not None:
        body["messages"] = messages
    if instruction:
        body["instruction"] = instruction
    names = FieldNames(prefix=prefix, renamed=renamed, message_index=index)
    return ChatBody(source.get("model", default_model), body, names, local)


def _openai_messages(messages: Any, prefix: str) -> tuple[list[Any] | None, str, list[int]]:
    """(messages, instruction from the system messages, each message's index in the line)."""
    if not isinstance(messages, list):
        return messages, "", []  # validate_body names what is wrong with it
    converted: list[Any] = []
    system: list[str] = []
    index: list[int] = []
    for i, message in enumerate(messages):
        where = f"{prefix}messages[{i}]"
        if not isinstance(message, dict):
            raise JobError(f"{where}: must be an object, got {_kind(message)}")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise JobError(f"{where}.{extra[0]}: not supported (tool calls are not converted)")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_openai_text(content, f"{where}.content"))
        elif role in ("user", "assistant"):
            converted.append({"role": role, "content": _openai_content(content, where)})
            index.append(i)
        else:
            raise JobError(
                f"{where}.role: must be 'system', 'developer', 'user' or 'assistant', got {role!r}"
            )
    if messages and not converted:
        raise JobError(
            f"{prefix}messages: no user or assistant message (system messages become the "
            "instruction)"
        )
    return converted, "\n\n".join(system), index


def _openai_text(content: Any, where: str) -> str:
    """A system message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "\n\n".join(p["text"] for p in content)
    raise JobError(f"{where}: must be a string or a list of text parts")


def _openai_content(content: Any, where: str) -> Any:
    if not isinstance(content, list):
        return content  # a string passes; anything else is named by validate_body
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            blocks.append(_openai_image(part, at))
        elif kind == "text" or not isinstance(part, dict):
            blocks.append(part)  # checked as a text block (or named) by validate_body
        else:
            raise JobError(f"{at}.type: must be 'text' or 'image_url', got {kind!r}")
    return blocks


def _openai_image(part: dict[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    field = f"{where}.image_url.url" if isinstance(image, dict) else f"{where}.image_url"
    if isinstance(url, str) and url[:5].lower() == "data:":
        match = _DATA_URL.match(url)
        media_type = match["type"].lower() if match else None
        if match is None or media_type not in ACCEPTED_MEDIA_TYPES:
            raise JobError(
                f"{field}: a data: URL must be data:image/jpeg, png, gif or webp;base64,..."
            )
        data = url[match.end() :]
        _check_base64_image(data, media_type, field, field)
        source = {"type": "base64", "media_type": media_type, "data": data}
    else:
        check_image_url(url, field)
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def validate_body(
    body: dict[str, Any], model: str | None = None, names: FieldNames = NATIVE_NAMES
) -> None:
    """Check a request body the way the Claude model on Segmind does (and, for
    a model whose limits are known, its max_tokens against them)."""
    messages = body.get("messages")
    if messages is None:
        raise JobError(
            f"{names.top('messages')}: missing (a list of {{role, content}} objects is required)"
        )
    if not isinstance(messages, list) or not messages:
        raise JobError(f"{names.top('messages')}: must be a non-empty list")
    for i, message in enumerate(messages):
        _validate_message(message, names.message(i))
    if "instruction" in body and not isinstance(body["instruction"], str):
        raise JobError(f"{names.top('instruction')}: must be a string")
    if "temperature" in body:
        t = body["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise JobError(f"{names.top('temperature')}: must be a number from 0 to 1, got {t!r}")
    if "max_tokens" in body:
        m = body["max_tokens"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise JobError(f"{names.top('max_tokens')}: must be a positive integer, got {m!r}")
        limits = LIMITS.get(model or "")
        if limits is not None and m > limits.max_output_tokens:
            raise JobError(
                f"{names.top('max_tokens')}: {m:,} is over the {limits.max_output_tokens:,} "
                f"output tokens {model} can write"
            )
    if "stream" in body:
        # Results are collected whole by polling; a stream would never be read.
        raise JobError(f"{names.top('stream')}: batchrunner collects whole answers; remove it")


def _validate_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise JobError(f"{where}: must be an object, got {_kind(message)}")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise JobError(f"{where}.role: must be 'user' or 'assistant', got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        if not content.strip():
            raise JobError(f"{where}.content: must not be empty or only whitespace")
        return
    if not isinstance(content, list) or not content:
        raise JobError(f"{where}.content: must be a string or a non-empty list of blocks")
    for j, block in enumerate(content):
        _validate_block(block, f"{where}.content[{j}]")


def _validate_block(block: Any, where: str) -> None:
    if not isinstance(block, dict):
        raise JobError(f"{where}: must be an object, got {_kind(block)}")
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise JobError(f"{where}.text: must be a string")
        if not text.strip():
            raise JobError(f"{where}.text: must not be empty or only whitespace")
        return
    if kind != "image":
        raise JobError(f"{where}.type: must be 'text' or 'image', got {kind!r}")
    source = block.get("source")
    if not isinstance(source, dict):
        raise JobError(f"{where}.source: must be an object")
    source_type = source.get("type")
    if source_type == "path":
        if not isinstance(source.get("path"), str) or not source["path"]:
            raise JobError(f"{where}.source.path: must be a non-empty string")
        try:
            max_side_of(source)
        except ImageError:
            raise JobError(
                f"{where}.source.max_side: must be a positive integer, got {source['max_side']!r}"
            ) from None
    elif source_type == "base64":
        media_type = source.get("media_type")
        if media_type not in ACCEPTED_MEDIA_TYPES:
            raise JobError(
                f"{where}.source.media_type: must be one of "
                f"{', '.join(sorted(ACCEPTED_MEDIA_TYPES))}, got {media_type!r}"
            )
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise JobError(f"{where}.source.data: must be a non-empty base64 string")
        _check_base64_image(data, media_type, f"{where}.source.data", f"{where}.source.media_type")
    elif source_type == "url":
        check_image_url(source.get("url"), f"{where}.source.url")
    else:
        raise JobError(
            f"{where}.source.type: must be 'base64', 'path' or 'url', got {source_type!r}"
        )


def check_image_url(url: Any, field: str) -> None:
    """An image URL fetched at submit: http or https, with a host."""
    if not isinstance(url, str) or not url:
        raise JobError(f"{field}: must be a non-empty string")
    if len(url) > MAX_IMAGE_URL_CHARS:
        raise JobError(f"{field}: longer than {MAX_IMAGE_URL_CHARS:,} characters")
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    if scheme.lower() not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise JobError(f"{field}: must be an http:// or https:// URL, got {url[:80]!r}")


def _check_base64_image(data: str, media_type: str, data_field: str, type_field: str) -> None:
    """Check inline image data as the API would, before any request.

    The decoded bytes are only looked at, never kept: memory stays one line's worth.
    """
    if data.startswith("data:"):
        comma = data.find(",", 0, 200)
        prefix = data[: comma + 1] if comma >= 0 else data[:30] + "..."
        raise JobError(
            f"{data_field}: starts with a data: URL prefix ({prefix!r}); remove the data: URL "
            "prefix and keep only the base64 text"
        )
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise JobError(f"{data_field}: not valid base64 ({_base64_problem(data, exc)})") from None
    if len(decoded) > MAX_IMAGE_BYTES:
        raise JobError(
            f"{data_field}: the image is {len(decoded):,} bytes after decoding, over the "
            f"5 MB limit ({MAX_IMAGE_BYTES:,} bytes)"
        )
    head = decoded[:SNIFF_BYTES]
    actual = sniff_media_type(head)
    if actual is None:
        refused = other_format(head)
        if refused is not None:
            raise JobError(
                f"{data_field}: the decoded data is a {refused} image, "
                "not a JPEG, PNG, GIF or WebP image"
            )
        raise JobError(
            f"{data_field}: the decoded data is not an image (it starts with {head[:16]!r})"
        )
    if actual != media_type:
        raise JobError(
            f"{type_field}: says {media_type} but the decoded data is a "
            f"{FORMAT_NAMES[actual]} image ({actual})"
        )


def _base64_problem(data: str, exc: Exception) -> str:
    """Why `data` is not strict base64: the first stray character, else Python's reason."""
    stray = _NOT_BASE64.search(data)
    if stray is None:
        return str(exc)  # e.g. "Incorrect padding"
    return (
        f"{stray.group()!r} at character {stray.start() + 1:,}; only A-Z, a-z, 0-9, + and / "
        "with = padding, without spaces or line breaks"
    )


def materialize_body(
    body: dict[str, Any], base_dir: Path, fetched: Mapping[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    """The body to send: local image paths read and base64-encoded, image URLs
    replaced by the sources `fetched` for them (see `fetch.ImageFetcher`).

    Raises ImageError naming the path. The job's own body is left untouched
    (a resubmission reads the file again rather than keeping megabytes around).
    """
    if not has_path_images(body) and not fetched:
        return body
    sent = copy.deepcopy(body)
    for source_holder in image_blocks(sent):
        source = source_holder["source"]
        if source["type"] == "path":
            from batchrunner.prepare import prepare_source  # Pillow only once images are read

            source_holder["source"] = prepare_source(source, base_dir)
        elif source["type"] == "url" and fetched is not None:
            source_holder["source"] = fetched[source["url"]]
    return sent


def has_path_images(body: dict[str, Any]) -> bool:
    return any(block["source"]["type"] == "path" for block in image_blocks(body))


def _kind(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
        dict: "an object",
    }.get(type(value), type(value).__name__)
