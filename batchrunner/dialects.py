"""The two client dialects `serve` speaks: OpenAI Chat Completions and
Anthropic Messages. Requests become Segmind bodies through the reader's own
conversion and checks (an OpenAI request exactly as an OpenAI Batch line's
body); answers and errors are shaped the way each API shapes them.

What a Segmind body cannot carry is applied here, or refused naming the field:
- stop sequences (`stop`, `stop_sequences`): the model page documents none,
  so the answer is cut at the first one here, and reported the way each API
  does (`finish_reason: "stop"`; `stop_reason: "stop_sequence"`). Tokens the
  model wrote past it are still paid (they are in `usage`).
- OpenAI `seed`: Claude has none; it only tells requests apart (two requests
  that differ only by seed are two requests).
- `stream: true`: refused with a 400 (see `STREAM_REFUSED`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from batchrunner.models import ALIASES, LIMITS, segmind_slug
from batchrunner.reader import (
    FieldNames,
    JobError,
    _system_text,
    digest,
    fingerprint,
    openai_chat_body,
    validate_body,
)

OPENAI = "openai"
ANTHROPIC = "anthropic"

MAX_STOP_SEQUENCES = 16
STREAM_REFUSED = (
    "stream: batchrunner serve answers whole (it collects the finished answer from Segmind "
    "by polling, so there is nothing to stream); send stream: false or leave it out"
)

ANTHROPIC_KEYS = frozenset({"model", "messages", "system", "max_tokens", "temperature"})
ANTHROPIC_DROPPED = frozenset({"metadata"})
"""Bookkeeping that does not change an answer: left out."""


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """A client's request, converted and checked, before any Segmind request."""

    dialect: str
    model: str
    """The Segmind slug."""
    client_model: str
    """The model id the client gave (answers echo it)."""
    body: dict[str, Any]
    stop: tuple[str, ...]
    identity: str
    """Same identity, same request: a client's retry of it is answered without paying again."""
    fingerprint: str
    """The reader's fingerprint of (model, body)."""


class RequestError(ValueError):
    """A request a client must fix: a 400 naming `field`."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


def convert(dialect: str, data: Any, default_model: str) -> ServedRequest:
    """The ServedRequest of a client's JSON body, or RequestError naming the field."""
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object", None)
    try:
        if data.get("stream") not in (None, False):
            raise JobError(STREAM_REFUSED)
        if dialect == OPENAI:
            chat = openai_chat_body(
                data, default_model, prefix="", keep=frozenset({"stop", "seed", "stream"})
            )
            model, body, names = chat.model, chat.body, chat.names
            stop = _stop_list(chat.local.get("stop"), "stop", max_count=4)
            seed = chat.local.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise JobError(f"seed: must be an integer, got {seed!r}")
        else:
            model, body, names, stop = _anthropic_body(data, default_model)
            seed = None
        if not isinstance(model, str) or not model or "/" in model:
            raise JobError("model: must be a model id like 'claude-3.5-sonnet'")
        slug = segmind_slug(model)
        validate_body(body, slug, names)
        _refuse_local_files(body, names)
    except JobError as exc:
        message = str(exc)
        return_field = message.split(":", 1)[0] if ":" in message else None
        raise RequestError(message, return_field) from None
    print_ = fingerprint(slug, body)
    identity = digest(orjson.dumps([print_, list(stop), seed]))
    return ServedRequest(dialect, slug, model, body, stop, identity, print_)


def _anthropic_body(
    data: dict[str, Any], default_model: str
) -> tuple[Any, dict[str, Any], FieldNames, tuple[str, ...]]:
    body: dict[str, Any] = {}
    stop: tuple[str, ...] = ()
    for key, value in data.items():
        if key in ("model", "stream") or key in ANTHROPIC_DROPPED:
            continue
        if key == "system":
            try:
                body["instruction"] = _system_text(value)
            except JobError:
                raise JobError("system: must be a string or a list of text blocks") from None
        elif key == "stop_sequences":
            stop = _stop_list(value, key, max_count=MAX_STOP_SEQUENCES)
        elif key in ANTHROPIC_KEYS:
            body[key] = value
        else:
            raise JobError(
                f"{key}: not supported when running on Segmind's Claude (a request may have "
                "model, messages, system, max_tokens, temperature, stop_sequences, metadata); "
                "remove it"
            )
    if "max_tokens" not in data:
        raise JobError("max_tokens: missing (the Messages API requires it)")
    names = FieldNames(renamed={"instruction": "system"})
    return data.get("model", default_model), body, names, stop


def _stop_list(value: Any, field: str, *, max_count: int) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or len(items) > max_count
        or not all(isinstance(s, str) and s for s in items)
    ):
        raise JobError(f"{field}: must be a non-empty string or a list of at most {max_count}")
    return tuple(items)


def _refuse_local_files(body: dict[str, Any], names: FieldNames) -> None:
    """A client over HTTP names no file of this machine (a jobs file may)."""
    for i, message in enumerate(body["messages"]):
        content = message["content"]
        for j, block in enumerate(content if isinstance(content, list) else ()):
            if block["type"] == "image" and block["source"]["type"] == "path":
                raise JobError(
                    f"{names.message(i)}.content[{j}].source.type: 'path' is not served over "
                    "HTTP; send the image as base64 or by URL"
                )


# --------------------------------------------------------------------------- answers


def cut_at_stop(message: dict[str, Any], stop: tuple[str, ...]) -> tuple[str, str | None]:
    """The message's text, cut before the first stop sequence; and that sequence."""
    text = "".join(
        block.get("text", "") for block in message.get("content", ()) if block.get("type") == "text"
    )
    first: tuple[int, str] | None = None
    for sequence in stop:
        at = text.find(sequence)
        if at >= 0 and (first is None or at < first[0]):
            first = (at, sequence)
    if first is None:
        return text, None
    return text[: first[0]], first[1]


_OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def answer(request: ServedRequest, message: dict[str, Any], request_id: str | None) -> Any:
    """A Segmind (Anthropic) message as the client's API answers."""
    text, matched = cut_at_stop(message, request.stop)
    usage = message.get("usage") or {}
    tokens_in = int(usage.get("input_tokens") or 0)
    tokens_out = int(usage.get("output_tokens") or 0)
    stop_reason = "stop_sequence" if matched is not None else message.get("stop_reason")
    if request.dialect == ANTHROPIC:
        return {
            "id": message.get("id") or f"msg_{request_id}",
            "type": "message",
            "role": "assistant",
            "model": request.client_model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": matched,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
    return {
        "id": f"chatcmpl-{request_id or message.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.client_model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": _OPENAI_FINISH.get(str(stop_reason), "stop"),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
        },
    }


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_OPENAI_ERRORS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error(dialect: str, status: int, message: str, field: str | None = None) -> Any:
    """An error body as the client's API shapes it."""
    if dialect == ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    code = {401: "invalid_api_key", 404: "model_not_found"}.get(status)
    kind = _OPENAI_ERRORS.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": field, "code": code}}


def models(default_model: str) -> dict[str, Any]:
    """GET /v1/models: the served models and the Anthropic ids that map to them,
    in a list both SDKs read (OpenAI's `object`/`owned_by`, Anthropic's
    `type`/`display_name`/`created_at`)."""
    ids = list(dict.fromkeys([default_model, *LIMITS, *ALIASES]))
    data = [
        {
            "id": model_id,
            "object": "model",
            "type": "model",
            "created": 0,
            "created_at": "1970-01-01T00:00:00Z",
            "owned_by": "segmind",
            "display_name": model_id
            if segmind_slug(model_id) == model_id
            else f"{model_id} (runs {segmind_slug(model_id)} on Segmind)",
        }
        for model_id in ids
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": ids[0],
        "last_id": ids[-1],
    }
