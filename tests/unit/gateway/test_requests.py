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
)

pytestmark = pytest.mark.unit


def _forwarded(raw: bytes, call: ApiCall, served_name: str) -> bytes:
    """What goes to the backend for `raw`, sent to a model served as
    `served_name`."""
    return parse_body(raw, call).upstream(served_name)


def test_alias_is_replaced_and_everything_else_kept() -> None:
    body = {"model": "chat", "messages": [{"role": "user"}], "mystery": {"a": 1}}
    out = orjson.loads(_forwarded(orjson.dumps(body), CHAT, "smollm2"))
    assert out == {**body, "model": "smollm2"}


@pytest.mark.parametrize(
    ("call", "raw"),
    [
        (COMPLETIONS, b'{"model":"smollm2",  "prompt":"x"}'),
        (COMPLETIONS, b'{"model": "smollm2", "prompt": "x", "stream": false}'),
        # A stream that asked for the usage chunk itself.
        (
            COMPLETIONS,
            b'{"model": "smollm2", "prompt": "x", "stream": true, '
            b'"stream_options": {"include_usage": true}}',
        ),
        # Embeddings do not stream, whatever the body says.
        (EMBEDDINGS, b'{"model": "smollm2", "input": "x", "stream": true}'),
    ],
)
def test_unchanged_bodies_are_the_same_bytes(call: ApiCall, raw: bytes) -> None:
    assert _forwarded(raw, call, "smollm2") is raw


def test_streams_ask_for_usage_keeping_other_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous": True}}
    raw = orjson.dumps({**body, "prompt": "x"})
    out = orjson.loads(_forwarded(raw, COMPLETIONS, "m"))
    assert out["stream_options"] == {"continuous": True, "include_usage": True}


# What each rewrite sends, byte for byte: the served name and the usage option
# where the client's body had them, else added at its end.
REWRITES = [
    (b'{"model":"chat","prompt":"x","n":2}', b'{"model":"m","prompt":"x","n":2}'),
    (
        b'{"model":"m","prompt":"x","stream":true}',
        b'{"model":"m","prompt":"x","stream":true,'
        b'"stream_options":{"include_usage":true}}',
    ),
    (
        b'{"model":"chat","prompt":"x","stream":true}',
        b'{"model":"m","prompt":"x","stream":true,'
        b'"stream_options":{"include_usage":true}}',
    ),
    (
        b'{"stream_options":{"continuous":true},"model":"m","prompt":"x",'
        b'"stream":true}',
        b'{"stream_options":{"continuous":true,"include_usage":true},"model":"m",'
        b'"prompt":"x","stream":true}',
    ),
    (
        b'{"model":"m","prompt":"x","stream":true,'
        b'"stream_options":{"include_usage":false}}',
        b'{"model":"m","prompt":"x","stream":true,'
        b'"stream_options":{"include_usage":true}}',
    ),
    (
        b'{"model":"chat","prompt":"x","stream_options":"yes","stream":true}',
        b'{"model":"m","prompt":"x","stream_options":{"include_usage":true},'
        b'"stream":true}',
    ),
]


@pytest.mark.parametrize(("raw", "sent"), REWRITES)
def test_a_rewritten_body_is_the_clients_with_the_rewritten_fields(
    raw: bytes, sent: bytes
) -> None:
    assert _forwarded(raw, COMPLETIONS, "m") == sent


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What orjson writes meanwhile."""
    written: list[object] = []
    dumps = orjson.dumps

    def counted(value: object, *args: Any, **kwargs: Any) -> bytes:
        written.append(value)
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(orjson, "dumps", counted)
    return written


@pytest.mark.parametrize(
    ("raw", "served", "times"),
    [
        (b'{"model":"m","prompt":"x"}', "m", 1),  # the depth check
        # The check writes what goes upstream: a stream's usage option added.
        (b'{"model":"m","prompt":"x","stream":true}', "m", 1),
        # The served name is known only once the body was checked.
        (b'{"model":"chat","prompt":"x","stream":true}', "m", 2),
        (b'{"model":"chat","prompt":"x"}', "m", 2),
    ],
)
def test_a_body_is_written_once_unless_its_model_is_an_alias(
    writes: list[object], raw: bytes, served: str, times: int
) -> None:
    _forwarded(raw, COMPLETIONS, served)
    assert len(writes) == times


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


@pytest.mark.parametrize("stream", [b"", b'"stream": true, '])
def test_a_body_as_deep_as_json_can_be_written_is_read_and_rewritten(
    stream: bytes,
) -> None:
    raw = _deep_body(MAX_DEPTH).replace(b"{", b"{" + stream, 1)
    body = parse_body(raw, COMPLETIONS).body
    out = orjson.loads(_forwarded(raw, COMPLETIONS, "served"))
    assert out["deep"] == body["deep"]


def test_a_stream_option_nested_too_deeply_is_refused_though_replaced() -> None:
    # The option the gateway replaces (it is no object) is what nests too
    # deeply: the body is refused all the same, as the client sent it.
    deep = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    raw = b'{"model": "m", "prompt": "x", "stream": true, "stream_options": '
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw + deep + b"}", COMPLETIONS)
    assert info.value.message == TOO_DEEP


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
        body = parse_body(orjson.dumps(_with(call, call.prompt_field, ids)), call).body
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
