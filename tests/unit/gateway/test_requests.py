"""Request checks and the body sent upstream (alias mapping, usage option)."""

from __future__ import annotations

import orjson
import pytest

from citadel.gateway.errors import InvalidRequest
from citadel.gateway.services.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MAX_DEPTH,
    TOO_DEEP,
    parse_body,
    upstream_body,
)

pytestmark = pytest.mark.unit


def test_alias_is_replaced_and_everything_else_kept() -> None:
    body = {"model": "chat", "messages": [{"role": "user"}], "mystery": {"a": 1}}
    raw = orjson.dumps(body)
    out = orjson.loads(upstream_body(raw, body, "smollm2", stream=False))
    assert out == {**body, "model": "smollm2"}


def test_unchanged_bodies_are_the_same_bytes() -> None:
    raw = b'{"model":"smollm2",  "prompt":"x"}'
    assert upstream_body(raw, orjson.loads(raw), "smollm2", stream=False) is raw


def test_streams_ask_for_usage_keeping_other_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous": True}}
    out = orjson.loads(upstream_body(orjson.dumps(body), body, "m", stream=True))
    assert out["stream_options"] == {"continuous": True, "include_usage": True}
    asked = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    raw = orjson.dumps(asked)
    assert upstream_body(raw, asked, "m", stream=True) is raw


@pytest.mark.parametrize(
    ("call", "raw", "param"),
    [
        (CHAT, b'{"model": "m", "messages": [1]}', "messages"),
        (CHAT, b'{"model": 3, "messages": [{}]}', "model"),
        (CHAT, b'{"model": "m", "messages": [{}], "stream": "yes"}', "stream"),
        (COMPLETIONS, b'{"model": "m", "prompt": 4}', "prompt"),
        (EMBEDDINGS, b'{"model": "m"}', "input"),
        (CHAT, b'{"model": "m", "messages": [{}], "n": -1}', "n"),
    ],
)
def test_invalid_fields_name_the_param(call: object, raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw, call)  # type: ignore[arg-type]
    assert info.value.param == param


def _deep_body(levels: int) -> bytes:
    """A completions body whose arrays and objects nest `levels` deep (the body
    itself is the first level)."""
    arrays = levels - 1
    return (
        b'{"model": "m", "prompt": "x", "deep": ' + b"[" * arrays + b"]" * arrays + b"}"
    )


def test_a_body_nested_deeper_than_json_can_be_written_is_refused() -> None:
    # orjson reads 1,024 levels but writes 254: a deeper body, read, could not
    # be written again (an alias replaced, a stream's usage option added).
    raw = _deep_body(MAX_DEPTH + 1)
    assert orjson.loads(raw)  # what the reader takes
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw, COMPLETIONS)
    assert info.value.message == TOO_DEEP
    assert str(MAX_DEPTH) in TOO_DEEP


def test_a_body_as_deep_as_json_can_be_written_is_read_and_rewritten() -> None:
    raw = _deep_body(MAX_DEPTH)
    body = parse_body(raw, COMPLETIONS)
    out = orjson.loads(upstream_body(raw, body, "served", stream=True))
    assert out["deep"] == body["deep"]
