"""serve's request conversion and answer shaping (pure functions, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from batchrunner import dialects
from batchrunner.dialects import ANTHROPIC, OPENAI, RequestError, convert

USER = [{"role": "user", "content": "hello"}]


def test_openai_request_becomes_the_batch_lines_segmind_body() -> None:
    served = convert(
        OPENAI,
        {
            "model": "claude-3-5-sonnet-20241022",
            "messages": [{"role": "system", "content": "Be brief."}, *USER],
            "max_completion_tokens": 32,
            "temperature": 0,
            "stop": "\n\n",
            "seed": 1234,
            "top_p": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "n": 1,
            "user": "eval",
        },
        "claude-3.5-sonnet",
    )
    assert served.model == "claude-3.5-sonnet"
    assert served.client_model == "claude-3-5-sonnet-20241022"
    assert served.body == {
        "max_tokens": 32,
        "temperature": 0,
        "messages": USER,
        "instruction": "Be brief.",
    }
    assert served.stop == ("\n\n",)


@pytest.mark.parametrize(
    ("dialect", "data", "field"),
    [
        (OPENAI, {"messages": USER, "stream": True}, "stream"),
        (OPENAI, {"messages": USER, "top_p": 0.5}, "top_p"),
        (OPENAI, {"messages": USER, "temperature": 2}, "temperature"),
        (OPENAI, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (OPENAI, {"messages": USER, "stop": ["a", 3]}, "stop"),
        (ANTHROPIC, {"messages": USER}, "max_tokens"),
        (ANTHROPIC, {"messages": USER, "max_tokens": 8, "top_k": 5}, "top_k"),
        (ANTHROPIC, {"messages": USER, "max_tokens": 8, "stream": True}, "stream"),
        (ANTHROPIC, {"messages": USER, "max_tokens": 8, "system": 3}, "system"),
        (
            ANTHROPIC,
            {
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "path", "path": "/x"}}],
                    }
                ],
            },
            "messages[0].content[0].source.type",
        ),
    ],
)
def test_a_bad_request_names_its_field(dialect: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as refused:
        convert(dialect, data, "claude-3.5-sonnet")
    assert refused.value.field == field, str(refused.value)


def test_identity_is_the_converted_request_and_its_local_parameters() -> None:
    def identity(dialect: str, **extra: Any) -> str:
        data = {"messages": USER, "max_tokens": 8, **extra}
        return convert(dialect, data, "claude-3.5-sonnet").identity

    assert identity(OPENAI) == identity(ANTHROPIC)  # the same Segmind request
    assert identity(OPENAI) == identity(OPENAI, user="someone")  # bookkeeping only
    assert identity(OPENAI) != identity(OPENAI, seed=1)
    assert identity(OPENAI) != identity(OPENAI, stop=["x"])
    assert identity(OPENAI) != identity(OPENAI, temperature=0.5)


def test_answers_cut_at_the_first_stop_sequence_in_each_dialect() -> None:
    message = {
        "id": "msg_1",
        "content": [{"type": "text", "text": "one. two. END three"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "output_tokens": 7},
    }
    stops = {"stop": ["END", "two"]}
    openai_request = convert(OPENAI, {"messages": USER, **stops}, "claude-3.5-sonnet")
    shaped = dialects.answer(openai_request, message, "rid")
    assert shaped["choices"][0]["message"]["content"] == "one. "
    assert shaped["choices"][0]["finish_reason"] == "stop"
    assert shaped["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    anthropic_request = convert(
        ANTHROPIC,
        {"messages": USER, "max_tokens": 8, "stop_sequences": ["END"]},
        "claude-3.5-sonnet",
    )
    shaped = dialects.answer(anthropic_request, message, "rid")
    assert shaped["content"] == [{"type": "text", "text": "one. two. "}]
    assert (shaped["stop_reason"], shaped["stop_sequence"]) == ("stop_sequence", "END")
    plain = convert(OPENAI, {"messages": USER}, "claude-3.5-sonnet")
    cut = dict(message, stop_reason="max_tokens")
    assert dialects.answer(plain, cut, "rid")["choices"][0]["finish_reason"] == "length"
