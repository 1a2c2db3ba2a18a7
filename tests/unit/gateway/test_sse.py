"""The SSE relay's event cutting and usage handling."""

from __future__ import annotations

import orjson
import pytest

from citadel.gateway.services.sse import EventFilter, Usage, usage_of_body

pytestmark = pytest.mark.unit

TOKEN = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_complete_events_pass_at_once_and_partial_ones_wait() -> None:
    f = EventFilter(keep_usage_chunk=True)
    assert f.feed(TOKEN) == TOKEN
    assert f.feed(TOKEN[:7]) == b""
    assert f.feed(TOKEN[7:] + TOKEN[:3]) == TOKEN
    assert f.feed(TOKEN[3:]) == TOKEN
    assert f.rest() == b""


def test_usage_is_read_and_the_usage_only_chunk_dropped_unless_asked() -> None:
    dropped = EventFilter(keep_usage_chunk=False)
    assert dropped.feed(TOKEN + USAGE + DONE) == TOKEN + DONE
    assert dropped.usage == Usage(4, 2)
    kept = EventFilter(keep_usage_chunk=True)
    assert kept.feed(USAGE[:20]) == b""
    assert kept.feed(USAGE[20:] + DONE) == USAGE + DONE
    assert kept.usage is not None and kept.usage.total == 6


def test_usage_on_a_content_chunk_is_never_dropped() -> None:
    chunk = {"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}}
    event = b"data: " + orjson.dumps(chunk) + b"\n\n"
    f = EventFilter(keep_usage_chunk=False)
    assert f.feed(event) == event
    assert f.usage == Usage(1, 0)


def test_trailing_bytes_without_an_event_end_are_flushed() -> None:
    f = EventFilter(keep_usage_chunk=False)
    assert f.feed(b"data: x") == b""
    assert f.rest() == b"data: x"


def test_usage_of_a_whole_body() -> None:
    assert usage_of_body(b'{"usage":{"prompt_tokens":3,"completion_tokens":1}}') == (
        Usage(3, 1)
    )
    assert usage_of_body(b'{"choices":[]}') is None
    assert usage_of_body(b'{"usage": broken') is None


ERROR = b'data: {"error":{"message":"engine died","type":"InternalServerError"}}\n\n'


def test_an_error_event_is_noted_and_relayed() -> None:
    f = EventFilter(keep_usage_chunk=False)
    assert f.feed(TOKEN + ERROR[:9]) == TOKEN
    assert f.error is None
    assert f.feed(ERROR[9:] + DONE) == ERROR + DONE
    assert f.error is not None
    assert f.error["error"]["message"] == "engine died"


def test_the_word_error_in_a_chunk_is_no_error_event() -> None:
    logprobs = {"content": [{"token": "error", "logprob": -0.5}]}
    chunk = {"choices": [{"delta": {"content": '"error"'}, "logprobs": logprobs}]}
    event = b"data: " + orjson.dumps(chunk) + b"\n\n"
    f = EventFilter(keep_usage_chunk=False)
    assert f.feed(event + USAGE) == event
    assert f.error is None
    assert f.usage == Usage(4, 2)
