"""Request checks and the body sent upstream (alias mapping, usage option)."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from citadel.gateway.errors import InvalidRequest
from citadel.gateway.services.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MAX_CONTENT_PARTS,
    MAX_DEPTH,
    MAX_MESSAGES,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_TOOLS,
    TOO_DEEP,
    ApiCall,
    parse_body,
    request_id,
    session_id,
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
        # What vLLM reads as 64 sequences, which the estimate must not read as 1.
        (COMPLETIONS, b'{"model": "m", "prompt": "x", "best_of": "64"}', "best_of"),
        (COMPLETIONS, b'{"model": "m", "prompt": "x", "best_of": 64.0}', "best_of"),
        (COMPLETIONS, b'{"model": "m", "prompt": "x", "best_of": 0}', "best_of"),
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


def _with(call: ApiCall, field: str, value: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "m", call.prompt_field: "x"}
    if call is CHAT:
        base["messages"] = [{"role": "user", "content": "x"}]
    return {**base, field: value}


ARRAYS = [
    (CHAT, "messages", lambda n: [{}] * n, MAX_MESSAGES),
    (COMPLETIONS, "prompt", lambda n: ["x"] * n, MAX_PROMPTS),
    (COMPLETIONS, "prompt", lambda n: [[1]] * n, MAX_PROMPTS),
    (EMBEDDINGS, "input", lambda n: ["x"] * n, MAX_PROMPTS),
    (CHAT, "tools", lambda n: [{}] * n, MAX_TOOLS),
    (CHAT, "functions", lambda n: [{}] * n, MAX_TOOLS),
    (COMPLETIONS, "stop", lambda n: ["x"] * n, MAX_STOP),
]


@pytest.mark.parametrize(("call", "field", "make", "limit"), ARRAYS)
def test_an_array_past_its_limit_is_refused_before_it_is_walked(
    call: ApiCall, field: str, make: Any, limit: int
) -> None:
    # 8 MiB of `[{}, {}, ...]` was 2.8 million messages, walked for seconds by
    # the estimate on the event loop, even for a request then refused a 429.
    assert parse_body(orjson.dumps(_with(call, field, make(limit))), call)
    with pytest.raises(InvalidRequest) as info:
        parse_body(orjson.dumps(_with(call, field, make(limit + 1))), call)
    assert info.value.param == field
    assert info.value.message == (
        f"`{field}` has {limit + 1:,} items; at most {limit:,} are allowed."
    )


def test_content_parts_are_limited_over_all_the_messages() -> None:
    part = {"type": "text", "text": "x"}
    half = MAX_CONTENT_PARTS // 2
    within = [{"role": "user", "content": [part] * half}] * 2
    assert parse_body(orjson.dumps({"model": "m", "messages": within}), CHAT)
    past = [*within, {"role": "user", "content": [part]}]
    with pytest.raises(InvalidRequest) as info:
        parse_body(orjson.dumps({"model": "m", "messages": past}), CHAT)
    assert info.value.param == "messages"
    assert f"{MAX_CONTENT_PARTS + 1:,} content parts" in info.value.message


def test_a_prompt_of_token_ids_is_bounded_by_the_body_size_alone() -> None:
    ids = list(range(128_000))  # a 128k context
    for call in (COMPLETIONS, EMBEDDINGS):
        body = parse_body(orjson.dumps(_with(call, call.prompt_field, ids)), call)
        assert body[call.prompt_field] == ids


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the garbage collector's passes while it is in use."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)


def test_reading_a_body_runs_no_garbage_collection(collections: list[int]) -> None:
    # Its passes, one per 700 new arrays or objects, made reading 8 MiB of
    # `[[], [], ...]` take 1.3 s instead of 0.17 s: 2,000 arrays made 2 or
    # more. Once read, one pass may come (it sees the body once).
    raw = orjson.dumps({"model": "m", "prompt": [[1]] * 2_000})
    gc.collect()
    collections.clear()
    parse_body(raw, COMPLETIONS)
    assert len(collections) <= 1
    assert gc.isenabled()


def test_reading_a_body_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        parse_body(b'{"model": "m", "prompt": "x"}', COMPLETIONS)
        assert not gc.isenabled()
        with pytest.raises(InvalidRequest):
            parse_body(b"{", COMPLETIONS)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(InvalidRequest):
        parse_body(b"{", COMPLETIONS)
    assert gc.isenabled()


@pytest.mark.parametrize("sent", ["conv-7", "a" * 128, "org/team:conv.1+x=y_z-2"])
def test_a_session_id_that_looks_like_an_id_is_kept(sent: str) -> None:
    assert session_id(sent) == sent


@pytest.mark.parametrize(
    "sent",
    [
        "x key=root status=200",  # a text log line's fields, forged
        "a" * 129,
        "a" * 4_000_000,
        "alice@example.com",
        "conv\n7",
        "Zoë",
    ],
)
def test_any_other_session_id_is_its_hash(sent: str) -> None:
    digest = hashlib.sha256(sent.encode()).hexdigest()
    assert session_id(sent) == f"sha256:{digest}"
    assert session_id(sent) == session_id(sent)  # the conversation stays pinned


@pytest.mark.parametrize("sent", [None, ""])
def test_no_session_id(sent: str | None) -> None:
    assert session_id(sent) is None


@pytest.mark.parametrize("sent", ["abc-1\n", "", "a b", "x" * 129, None])
def test_a_request_id_that_is_no_id_is_replaced(sent: str | None) -> None:
    """Matched whole: the pattern's `$` let a newline end an id, into every
    log line and the replica's header."""
    made = request_id(sent)
    assert made != sent and len(made) == 32


def test_a_request_id_that_is_an_id_is_kept() -> None:
    assert request_id("r-9:a/b+c=") == "r-9:a/b+c="
