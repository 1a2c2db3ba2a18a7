"""OpenAI's Responses API (`POST /v1/responses`): checked, estimated, routed,
relayed and counted as the other forwarded endpoints are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from openai.types.responses import ResponseErrorEvent
from starlette.types import Receive, Scope, Send

from citadel.gateway.api.openai import ForwardingFastPath
from citadel.gateway.errors import InvalidRequest
from citadel.gateway.services.limits import MEDIA_PART_TOKENS, estimate_tokens
from citadel.gateway.services.prefix import prefix_window, prompt_mark
from citadel.gateway.services.requests import (
    CHAT,
    MAX_MESSAGES,
    RESPONSES,
    parse_body,
    prompt_body,
)
from citadel.gateway.services.sse import (
    MAX_HELD_BYTES,
    MAX_HELD_EVENTS,
    EventFilter,
    Usage,
    error_event,
    error_of,
    usage_of_body,
)
from citadel.gateway.upstream import UpstreamBroken

pytestmark = pytest.mark.unit

USAGE = {"input_tokens": 21, "output_tokens": 5, "total_tokens": 26}
WHOLE = {
    "id": "resp_b934",
    "object": "response",
    "status": "incomplete",
    "output": [{"type": "message", "role": "assistant", "content": []}],
    "usage": {
        "input_tokens": 37,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 16,
        "total_tokens": 53,
    },
    "error": None,
}
ASK = {"model": "chat", "input": "What is the capital of France?"}


def _response(rid: str, status: str, usage: Any = None) -> dict[str, Any]:
    """A response object as vLLM 0.32 writes it into events (abridged)."""
    return {"id": rid, "object": "response", "status": status, "error": None}


def _event(kind: str, number: int, **payload: Any) -> bytes:
    """One event as vLLM 0.32 writes it: its type named twice, no `[DONE]`."""
    data = {**payload, "sequence_number": number, "type": kind}
    return f"event: {kind}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def _opening(rid: str) -> list[bytes]:
    response = {**_response(rid, "in_progress"), "usage": None}
    return [
        _event("response.created", 0, response=response),
        _event("response.in_progress", 1, response=response),
    ]


def _output(rid: str, final: str = "response.completed") -> list[bytes]:
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    done = {**_response(rid, "completed"), "usage": USAGE}
    return [
        _event("response.output_item.added", 2, item=item, output_index=0),
        _event("response.output_text.delta", 3, delta="Paris", item_id="msg_1"),
        _event(final, 4, response=done),
    ]


def _sample(harness: Any, name: str, **labels: str) -> float | None:
    sample = harness.deps.metrics.registry.get_sample_value
    return sample(name, labels)  # type: ignore[no-any-return]


def _requests(harness: Any, status: str) -> float | None:
    labels = {"api": "responses", "model": "smollm2", "status": status}
    labels.update(key="alice", door="rest")
    return _sample(harness, "citadel_gateway_requests_total", **labels)


# -- the request ------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        ASK,
        {**ASK, "instructions": "Be brief.", "max_output_tokens": 5},
        {"model": "chat", "input": [{"role": "user", "content": "hi"}]},
        {
            "model": "chat",
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
        },
        # Not Responses fields: vLLM ignores them, so the gateway does too.
        {**ASK, "n": "two", "max_tokens": 0},
        # With `previous_response_id` an empty input may mean something.
        {"model": "chat", "input": [], "previous_response_id": "resp_1"},
    ],
)
def test_responses_requests_pass_as_sent(body: dict[str, Any]) -> None:
    """A stream goes as sent: its usage always comes in its last event, and
    vLLM has no `stream_options` to ask for it."""
    raw = orjson.dumps({**body, "stream": True})
    parsed = parse_body(raw, RESPONSES)
    assert parsed.stream
    assert parsed.written == raw
    assert parsed.upstream(body["model"]) == raw


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "chat"}, "input"),
        ({"model": "chat", "input": 5}, "input"),
        ({"model": "chat", "input": None}, "input"),
        ({"model": "chat", "input": ["hi"]}, "input"),
        ({**ASK, "instructions": 5}, "instructions"),
        ({**ASK, "max_output_tokens": 0}, "max_output_tokens"),
        ({**ASK, "max_output_tokens": "16"}, "max_output_tokens"),
        ({**ASK, "max_output_tokens": 16.0}, "max_output_tokens"),
        ({**ASK, "stream": "yes"}, "stream"),
        ({"model": "chat", "input": [{}] * (MAX_MESSAGES + 1)}, "input"),
        ({"input": "hi"}, "model"),
    ],
)
def test_what_the_gateway_reads_of_a_response_request_is_checked(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_body(orjson.dumps(body), RESPONSES)
    assert refused.value.param == param


def test_instructions_and_a_string_input_are_read_as_a_chat() -> None:
    """What reads a prompt (the estimate, prefix-aware routing) reads the
    request as the chat vLLM renders for it."""
    body = {**ASK, "instructions": "Be brief.", "tools": [{"name": "f"}]}
    chat = {
        "model": "chat",
        "tools": [{"name": "f"}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": ASK["input"]},
        ],
    }
    assert prefix_window(prompt_body(body, RESPONSES)) == prefix_window(chat)
    assert prompt_mark(prompt_body(body, RESPONSES), in_window=0) == prompt_mark(
        chat, in_window=0
    )
    items = {"model": "chat", "input": chat["messages"], "tools": [{"name": "f"}]}
    assert prefix_window(prompt_body(items, RESPONSES)) == prefix_window(chat)
    # Any other endpoint's body is read as it is.
    assert prompt_body(chat, CHAT) is chat


def test_two_images_after_the_same_text_are_two_prefixes() -> None:
    """An `input_image` part stands in as its URL's hash, not its `detail`."""

    def asking(url: str) -> dict[str, Any]:
        image = {"type": "input_image", "detail": "auto", "image_url": url}
        content = [{"type": "input_text", "text": "What is this?"}, image]
        return {"model": "chat", "input": [{"role": "user", "content": content}]}

    one, two = (prompt_body(asking(u), RESPONSES) for u in ("https://a", "https://b"))
    assert prefix_window(one)[0] != prefix_window(two)[0]


# -- the estimate -----------------------------------------------------------


def test_a_response_is_estimated_as_its_chat_with_max_output_tokens() -> None:
    body = {**ASK, "instructions": "Be brief.", "max_output_tokens": 40}
    chat = {
        "model": "chat",
        "max_tokens": 40,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": ASK["input"]},
        ],
    }
    assert estimate_tokens(body, RESPONSES, 256) == estimate_tokens(chat, CHAT, 256)
    without = {**body, "max_output_tokens": None}
    assert estimate_tokens(without, RESPONSES, 256) == estimate_tokens(
        body, RESPONSES, 256
    ) + (256 - 40)
    # Chat's fields are no Responses fields: they change nothing.
    odd = {**body, "n": 8, "max_tokens": 9000}
    assert estimate_tokens(odd, RESPONSES, 256) == estimate_tokens(body, RESPONSES, 256)


def test_calls_their_outputs_and_images_count_in_the_estimate() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "x" * 400}
    image = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 4000}
    base = {"model": "chat", "input": [], "max_output_tokens": 1}
    counted = {
        "call": len(orjson.dumps([[call]])) // 4,
        "output": 100,
        "image": MEDIA_PART_TOKENS,
    }
    empty = estimate_tokens(base, RESPONSES, 256)
    for name, item in (("call", call), ("output", output)):
        body = {**base, "input": [item]}
        assert estimate_tokens(body, RESPONSES, 256) - empty >= counted[name]
    pictured = {**base, "input": [{"role": "user", "content": [image]}]}
    bare = {**base, "input": [{"role": "user", "content": []}]}
    added = estimate_tokens(pictured, RESPONSES, 256) - estimate_tokens(
        bare, RESPONSES, 256
    )
    assert added == counted["image"]


# -- usage and events -------------------------------------------------------


def test_the_usage_of_a_whole_response_is_read() -> None:
    assert usage_of_body(orjson.dumps(WHOLE)) == Usage(37, 16)


@pytest.mark.parametrize(
    "final", ["response.completed", "response.incomplete", "response.failed"]
)
def test_the_usage_is_read_from_each_final_event(final: str) -> None:
    events = EventFilter(True, RESPONSES.held)
    sent = b"".join(_opening("resp_1") + _output("resp_1", final))
    assert events.feed(sent) == sent
    assert events.usage == Usage(21, 5)


def test_no_usage_is_read_from_other_events() -> None:
    """The opening events' `usage` is null; an event that is no final one
    holding a `response` with a usage (none such today) is not read."""
    events = EventFilter(True)
    usage = {**_response("r", "completed"), "usage": USAGE}
    events.feed(_event("response.output_item.done", 3, response=usage))
    events.feed(b"".join(_opening("resp_1")))
    assert events.usage is None


def test_opening_events_are_held_until_the_first_output() -> None:
    opening, output = _opening("resp_1"), _output("resp_1")
    events = EventFilter(True, RESPONSES.held)
    assert events.feed(opening[0]) == b""
    assert events.feed(opening[1] + output[0][:10]) == b""
    assert events.feed(output[0][10:]) == opening[0] + opening[1] + output[0]
    assert events.feed(output[1]) == output[1]
    assert events.rest() == b""


def test_opening_events_of_a_stream_that_ends_there_are_given_at_its_end() -> None:
    opening = _opening("resp_1")
    events = EventFilter(True, RESPONSES.held)
    assert events.feed(b"".join(opening) + b"event: x") == b""
    assert events.rest() == b"".join(opening) + b"event: x"


def test_an_event_without_an_event_field_is_held_by_its_type() -> None:
    created = b'data: {"type":"response.created","response":{}}\n\n'
    events = EventFilter(True, RESPONSES.held)
    assert events.feed(created) == b""


def test_no_more_opening_events_are_held_than_the_bounds() -> None:
    """A replica that sends opening events without end is relayed from the
    first past the bounds: neither memory nor the wait grows with them."""
    created = _opening("resp_1")[0]
    events = EventFilter(True, RESPONSES.held)
    held = [events.feed(created) for _ in range(MAX_HELD_EVENTS)]
    assert held == [b""] * MAX_HELD_EVENTS
    assert events.feed(created) == created * (MAX_HELD_EVENTS + 1)
    assert not events.holding
    big = _event("response.in_progress", 1, response={"x": "y" * MAX_HELD_BYTES})
    events = EventFilter(True, RESPONSES.held)
    assert events.feed(created) == b""
    assert events.feed(big) == created + big


@pytest.mark.parametrize(
    ("parts", "ended"),
    [
        ([*_opening("r"), *_output("r")], True),
        ([*_opening("r"), *_output("r", "response.incomplete")], True),
        ([*_opening("r"), *_output("r")[:2]], False),
        ([*_opening("r"), _event("error", 2, code="x", message="boom")], True),
        ([], False),
    ],
)
def test_a_responses_stream_has_ended_only_on_its_closing_event(
    parts: list[bytes], ended: bool
) -> None:
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    for part in parts:
        events.feed(part)
    # Cut anywhere, the same: only complete events count.
    whole = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    whole.feed(b"".join(parts)[:-1])
    whole.feed(b"".join(parts)[-1:])
    assert events.ended is ended
    assert whole.ended is ended
    assert EventFilter(True).ended  # a chat's needs no closing event


def test_the_gateways_error_event_in_a_responses_stream_is_typed() -> None:
    body = {"error": {"message": "boom", "type": "api_error", "code": "x"}}
    event = error_event(body, 7)
    assert event.startswith(b"event: error\ndata: ")
    payload = orjson.loads(event.split(b"data: ", 1)[1])
    assert payload == {
        "type": "error",
        "code": "x",
        "message": "boom",
        "param": None,
        "sequence_number": 7,
        "error": body["error"],
    }
    # What a client that reads events by OpenAI's types takes it for.
    typed = ResponseErrorEvent.model_validate(payload)
    assert (typed.code, typed.message, typed.sequence_number) == ("x", "boom", 7)
    assert error_event(body) == b"data: " + orjson.dumps(body) + b"\n\n"


def test_an_appended_event_is_numbered_after_the_replicas_last() -> None:
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    for part in [*_opening("r"), *_output("r")[:2]]:
        events.feed(part)
    assert events.next_sequence() == 4
    events.feed(b": keep-alive\n\n")
    assert events.next_sequence() == 4


@pytest.mark.parametrize(
    "after",
    [b"data: [DONE]\n\n", b": keep-alive\n\n", b"\n\n", b"data: [DONE]\n\n\n\n"],
)
def test_what_follows_the_closing_event_does_not_unend_it(after: bytes) -> None:
    """Some servers end with `[DONE]`, a comment or a blank line after the
    closing event: the stream is complete all the same."""
    whole = b"".join([*_opening("r"), *_output("r")]) + after
    for cut in (len(whole), len(whole) - len(after), len(whole) - 1):
        events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
        events.feed(whole[:cut])
        events.feed(whole[cut:])
        events.finish()
        assert events.ended, (after, cut)


def test_a_last_event_without_its_blank_line_is_taken_whole() -> None:
    """The closing event ends with one LF, the body then ends: it is read
    (ended, its usage), and what follows goes after a blank line."""
    whole = b"".join([*_opening("r"), *_output("r")])[:-1]
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    out = events.feed(whole) + events.finish()
    assert events.ended and events.usage == Usage(21, 5)
    assert out.endswith(b"\n\n")
    partial = b"".join([*_opening("r"), *_output("r")[:2]])[:-2]
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    out = events.feed(partial) + events.finish()
    assert not events.ended and out.endswith(b"\n\n")
    # Cut off inside its data: dropped, as an SSE client would drop it,
    # rather than relayed as an event whose JSON a client cannot read.
    whole = b"".join([*_opening("r"), *_output("r")])
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    out = events.feed(whole[:-20]) + events.finish()
    assert out == b"".join([*_opening("r"), *_output("r")[:2]])
    assert not events.ended
    assert EventFilter(True).finish() == b""  # a chat's rest as before


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_events_with_cr_line_ends_are_cut_and_held_as_with_lf(
    newline: bytes,
) -> None:
    """SSE lets lines end in CR LF or CR (sse-starlette's default): held,
    relayed and ended as the same stream with LF, whatever the chunks."""
    parts = [*_opening("r"), *_output("r")]
    lf = b"".join(parts)
    crlf = lf.replace(b"\n", newline)
    for size in (1, 2, 3, 7, len(crlf)):
        events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
        out = b"".join(
            events.feed(crlf[i : i + size]) for i in range(0, len(crlf), size)
        )
        out += events.finish()
        assert out == lf, size
        assert events.ended and events.usage == Usage(21, 5)
    chat = EventFilter(True)
    assert chat.feed(b"data: {}\r\n\r") == b"data: {}\n\n"
    assert chat.feed(b"\ndata: {}\r\n") == b""
    assert chat.feed(b"\r\n") == b"data: {}\n\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_a_last_event_ending_in_one_newline_of_any_kind_is_taken_whole(
    newline: bytes,
) -> None:
    """The body ends right after the closing event's last line: its CR (or
    the CR of a CR LF cut there) ends that line, and the event is read."""
    whole = b"".join([*_opening("r"), *_output("r")])[:-1].replace(b"\n", newline)
    for size in (1, len(whole)):
        events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
        out = b"".join(
            events.feed(whole[i : i + size]) for i in range(0, len(whole), size)
        )
        out += events.finish()
        assert events.ended and events.usage == Usage(21, 5), size
        assert events.next_sequence() == 5
        assert out == b"".join([*_opening("r"), *_output("r")])
    # An empty read between a CR and its LF leaves the pair one line end.
    chat = EventFilter(True)
    assert chat.feed(b"data: {}\r") + chat.feed(b"") == b""
    assert chat.feed(b"\n\r\n") == b"data: {}\n\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_blank_line_after_an_opening_event_is_held_with_it(newline: bytes) -> None:
    opening, output = _opening("r"), _output("r")
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    assert events.feed((opening[0] + b"\n").replace(b"\n", newline)) == b""
    assert events.holding
    out = events.feed(b"".join([opening[1], *output]).replace(b"\n", newline))
    assert out == opening[0] + b"\n" + b"".join([opening[1], *output])


def test_an_empty_event_field_is_no_type() -> None:
    """SSE reads `event:` with nothing after it as no type: the data's tells."""
    done = orjson.dumps({"type": "response.completed", "response": {"usage": USAGE}})
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    events.feed(b"".join(_opening("r")) + _output("r")[0])
    events.feed(b"event:\ndata: " + done + b"\n\n")
    assert events.ended and events.usage == Usage(21, 5)


@pytest.mark.parametrize(
    "head", [b"event: message\n", b"event: response.completed\nevent: message\n"]
)
def test_sses_default_type_is_no_type(head: bytes) -> None:
    """`event: message` (SSE's default, and the last `event:` line wins) is
    no type: the data's `type` tells, as the openai client reads it."""
    done = orjson.dumps({"type": "response.completed", "response": {"usage": USAGE}})
    created = orjson.dumps({"type": "response.created", "response": {}})
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    assert events.feed(head + b"data: " + created + b"\n\n") == b""
    events.feed(_output("r")[0])
    events.feed(head + b"data: " + done + b"\n\n")
    assert events.ended and events.usage == Usage(21, 5)


CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


@pytest.mark.parametrize("ping", [b": ping\n\n", b":data: ping\n\n"])
def test_a_keep_alive_is_relayed_at_once_but_begins_no_answer(ping: bytes) -> None:
    """A comment (a proxy's keep-alive through a long wait, even one that
    mentions data:) goes out at once, with what was held, so the connections
    in front stay alive; the answer begins with the first data."""
    opening, output = _opening("r"), _output("r")
    events = EventFilter(True, RESPONSES.held, RESPONSES.closing)
    assert events.feed(opening[0]) == b""
    assert events.feed(ping) == opening[0] + ping
    assert not events.holding and not events.began
    assert events.feed(opening[1] + output[0]) == opening[1] + output[0]
    assert events.began
    chat = EventFilter(True)
    assert chat.feed(ping) == ping and not chat.began
    assert chat.feed(b"data\n\n") == b"data\n\n" and chat.began  # empty data


def test_a_lone_done_is_no_output() -> None:
    """A stream of nothing but `[DONE]` (and blank lines): the replica did
    no work, as one that sent nothing."""
    events = EventFilter(True)
    assert events.feed(b"data: [DONE]\n\n\n") == b""
    assert events.holding
    assert events.feed(CHUNK) == b"data: [DONE]\n\n\n" + CHUNK


def test_an_error_as_the_first_data_is_noted() -> None:
    error = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    events = EventFilter(True)
    assert events.feed(error) == error
    assert events.first_error == {"error": {"message": "boom", "code": 500}}
    events = EventFilter(True)
    events.feed(CHUNK + error)
    assert events.first_error is None and events.error is not None


@pytest.mark.parametrize(
    ("payload", "failed"),
    [
        ({"type": "error", "code": "x", "message": "boom", "param": None}, True),
        ({"type": "response.failed", "response": {"error": {"code": "x"}}}, True),
        ({"type": "response.created", "response": {"error": None}}, False),
        ({"error": {"message": "boom"}}, True),
    ],
)
def test_a_responses_streams_failure_events_are_errors(
    payload: dict[str, Any], failed: bool
) -> None:
    assert (error_of(payload) is not None) is failed


# -- through the gateway ----------------------------------------------------


@dataclass
class Ticking:
    """A streamed reply whose replica takes `prefill_s` between its opening
    events and its first output, on the test's clock."""

    parts: list[bytes | Exception]
    clock: Any
    prefill_s: float = 3.0
    status: int = 200
    content_type: str = "text/event-stream"
    retry_after: str | None = None
    closed: bool = False
    opened: list[bytes] = field(default_factory=list)

    async def read(self, timeout_s: float | None = None) -> bytes:
        return b""

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, Exception):
                raise part
            if b"response.output_item.added" in part:
                self.clock.now += self.prefill_s
            yield part

    def lift(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


async def test_a_replica_that_dies_in_prefill_is_tried_again_unseen(
    kit: Any,
) -> None:
    """The first replica sent its opening events, then died: the client gets
    the second's stream whole, never the first's response id; TTFT is the
    first output's, 3 s into prefill, not the opening's."""
    harness = kit.build(doc=kit.document(limits={"tpm": 10_000}))
    dead = Ticking([*_opening("resp_dead"), UpstreamBroken("reset")], harness.clock)
    good = Ticking([*_opening("resp_good"), *_output("resp_good")], harness.clock)
    harness.upstream.handler = lambda url, body: (
        dead if len(harness.upstream.calls) == 1 else good
    )
    body = {**ASK, "stream": True, "max_output_tokens": 16}
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json=body)
    assert answer.status_code == 200
    assert answer.content == b"".join(_opening("resp_good") + _output("resp_good"))
    assert b"resp_dead" not in answer.content
    assert dead.closed
    assert [c[0][9:] for c in harness.upstream.calls] == ["/v1/responses"] * 2
    assert all("stream_options" not in c[1] for c in harness.upstream.calls)
    ttft = "citadel_gateway_time_to_first_token_seconds"
    assert _sample(harness, ttft + "_count", model="smollm2") == 1
    assert _sample(harness, ttft + "_sum", model="smollm2") == 3.0
    assert _requests(harness, "200") == 1
    tokens = "citadel_gateway_tokens_total"
    labels = {"model": "smollm2", "key": "alice"}
    assert _sample(harness, tokens, kind="prompt", **labels) == 21
    assert _sample(harness, tokens, kind="completion", **labels) == 5


async def test_a_replica_that_ends_after_its_opening_events_is_tried_again(
    kit: Any,
) -> None:
    """Opening events and then the end: no answer began, so another replica
    answers, the client never seeing the first's response id; with none
    other, a 502 rather than a 200 with no answer."""
    harness = kit.build()
    empty = Ticking(_opening("resp_empty"), harness.clock)
    good = Ticking([*_opening("resp_good"), *_output("resp_good")], harness.clock)
    harness.upstream.handler = lambda url, body: (
        empty if len(harness.upstream.calls) == 1 else good
    )
    body = {**ASK, "stream": True}
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json=body)
    assert answer.status_code == 200
    assert answer.content == b"".join(_opening("resp_good") + _output("resp_good"))
    assert len(harness.upstream.calls) == 2
    harness.upstream.handler = lambda url, body: Ticking(
        _opening("resp_empty"), harness.clock
    )
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json=body)
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_error"


async def test_a_responses_stream_without_its_closing_event_ends_with_an_error(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica's stream stopped, cleanly, before `response.completed`:
    the client gets a typed error event (the openai client raises it), and
    the request is counted and logged as a broken stream."""
    harness = kit.build()
    cut = [*_opening("resp_1"), *_output("resp_1")[:2]]
    harness.upstream.handler = lambda url, body: Ticking(cut, harness.clock)
    caplog.set_level("INFO", logger="citadel.gateway.access")
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json={**ASK, "stream": True})
    assert answer.status_code == 200
    assert answer.content.startswith(b"".join(cut))
    last = answer.content[len(b"".join(cut)) :]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["code"] == "backend_error"
    assert error["sequence_number"] == 4
    assert "closing event" in error["message"]
    assert _requests(harness, "200") == 1
    logged = [r for r in caplog.records if r.getMessage() == "request"]
    assert [getattr(r, "code", None) for r in logged] == ["stream_broken"]


async def test_a_responses_stream_the_server_cuts_ends_with_a_typed_error(
    harness: Any, kit: Any
) -> None:
    """At the end of the shutdown grace a Responses stream still going ends
    with the error event of its kind, numbered after the replica's last."""
    began = asyncio.Event()

    class Endless(kit.reply):  # type: ignore[misc,name-defined]
        async def chunks(self, timeout_s: float | None = None) -> Any:
            yield b"".join([*_opening("r"), _output("r")[0]])
            began.set()
            await asyncio.Event().wait()

    async def post(url: str, body: bytes, headers: Any, timeout_s: Any = None) -> Any:
        return Endless(content_type="text/event-stream")

    harness.upstream.post = post
    receive = kit.staying(orjson.dumps({**ASK, "stream": True}))
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    task = asyncio.create_task(
        harness.served(kit.post_scope("/v1/responses"), receive, send)
    )
    await asyncio.wait_for(began.wait(), 5)
    while len(sent) < 2:
        await asyncio.sleep(0.01)
    harness.deps.proxy.stopping(0)
    task.cancel()  # what uvicorn does when the grace has run out
    await asyncio.wait_for(task, 5)
    last = b"".join(m.get("body", b"") for m in sent).split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    error = ResponseErrorEvent.model_validate_json(last.split(b"data: ", 1)[1])
    assert error.code == "shutting_down" and error.sequence_number == 3


async def test_ttft_of_a_stream_begun_with_a_keep_alive_is_its_first_data(
    kit: Any,
) -> None:
    """The keep-alive goes out at once (the 200 with it); the time to the
    first token is taken at the answer's first output, 3 s into prefill."""
    harness = kit.build()
    parts = [*_opening("r")[:1], b": ping\n\n", *_opening("r")[1:], *_output("r")]
    harness.upstream.handler = lambda url, body: Ticking(parts, harness.clock)
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json={**ASK, "stream": True})
    assert answer.status_code == 200 and answer.content == b"".join(parts)
    ttft = "citadel_gateway_time_to_first_token_seconds"
    assert _sample(harness, ttft + "_count", model="smollm2") == 1
    assert _sample(harness, ttft + "_sum", model="smollm2") == 3.0


@pytest.mark.parametrize(
    ("first", "tries"),
    [
        # The model server's error as the first data: relayed (it may be the
        # request's own; another replica would say the same), no TTFT.
        (b'data: {"error": {"message": "boom", "code": 500}}\n\n', 1),
        (b'data: {"error": {"message": "bad", "code": 400}}\n\n', 1),
        (b": ping\n\n", 1),
        # Nothing but the end: no work done, another replica is tried.
        (b"data: [DONE]\n\n", 2),
    ],
)
async def test_what_a_stream_begins_with_decides_its_retry_and_ttft(
    kit: Any, first: bytes, tries: int
) -> None:
    harness = kit.build()
    good = [CHUNK, b"data: [DONE]\n\n"]
    rest = [b'data: {"error": {"message": "x", "code": 500}}\n\n'] * (b"ping" in first)
    harness.upstream.handler = lambda url, body: Ticking(
        [first, *rest] if len(harness.upstream.calls) == 1 else good, harness.clock
    )
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "stream": True}
        )
    assert answer.status_code == 200
    assert len(harness.upstream.calls) == tries
    if tries == 2:
        assert answer.content == b"".join(good)
    else:
        assert answer.content.startswith(first)
    ttft = "citadel_gateway_time_to_first_token_seconds_count"
    assert _sample(harness, ttft, model="smollm2") == (1 if tries == 2 else None)


async def test_a_stream_of_only_a_keep_alive_ends_as_broken(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The keep-alive began the stream, then it ended with no answer: the
    client gets the error event, and it is counted as a broken stream."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: Ticking(
        [b": ping\n\n", b"data: [DONE]\n\n"], harness.clock
    )
    caplog.set_level("INFO", logger="citadel.gateway.access")
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "stream": True}
        )
    assert answer.status_code == 200
    assert answer.content.startswith(b": ping\n\ndata: [DONE]\n\ndata: {")
    assert b"without an answer" in answer.content
    logged = [r for r in caplog.records if r.getMessage() == "request"]
    assert [getattr(r, "code", None) for r in logged] == ["stream_broken"]


async def test_a_whole_response_is_settled_on_its_usage_and_logged(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build(doc=kit.document(limits={"tpm": 10_000}))
    harness.upstream.handler = lambda url, body: kit.reply(body=orjson.dumps(WHOLE))
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json=ASK)
        after = await client.post("/v1/responses", json=ASK)
    assert answer.status_code == 200
    assert answer.json() == WHOLE
    assert harness.upstream.calls[0][0].endswith("/v1/responses")
    assert harness.upstream.calls[0][1] == {**ASK, "model": "smollm2"}
    left = 10_000 - 53 - estimate_tokens(ASK, RESPONSES, 256)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert _requests(harness, "200") == 2
    logged = [r for r in caplog.records if r.name == "citadel.gateway.access"]
    assert [getattr(r, "api", None) for r in logged] == ["responses"] * 2


async def test_the_key_must_be_allowed_the_model(kit: Any) -> None:
    harness = kit.build(kit.document("other"))
    async with harness.client() as client:
        answer = await client.post("/v1/responses", json={**ASK, "model": "other"})
        bare = await client.post(
            "/v1/responses", json=ASK, headers={"authorization": ""}
        )
    assert answer.status_code == 403
    assert bare.status_code == 401
    assert not harness.upstream.calls


async def test_a_replicas_404_for_a_previous_response_is_relayed(kit: Any) -> None:
    """vLLM keeps no responses (unless told to): it answers the 404 itself."""
    said = {
        "error": {
            "message": "Response with id 'resp_abc' not found.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
    }
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(404, orjson.dumps(said))
    async with harness.client() as client:
        body = {**ASK, "previous_response_id": "resp_abc"}
        answer = await client.post("/v1/responses", json=body)
    assert answer.status_code == 404
    assert answer.json() == said
    assert harness.upstream.calls[0][1]["previous_response_id"] == "resp_abc"
    assert len(harness.upstream.calls) == 1
    assert _requests(harness, "404") == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/responses/resp_abc", 404),
        ("POST", "/v1/responses/resp_abc/cancel", 404),
        ("DELETE", "/v1/responses/resp_abc", 404),
        ("GET", "/v1/responses/resp_abc/input_items", 404),
        ("GET", "/v1/responses", 405),
    ],
)
async def test_stored_responses_are_not_served(
    harness: Any, method: str, path: str, status: int
) -> None:
    """The gateway keeps no responses; these carry no model to route by."""
    async with harness.client() as client:
        answer = await client.request(method, path)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not harness.upstream.calls


async def test_responses_are_routed_by_prefix_as_the_chat_they_stand_for(
    kit: Any,
) -> None:
    """A conversation sent as a Responses request goes where the same one
    sent as a chat went: instructions and input read as its messages."""
    harness = kit.build(
        kit.document(strategy="prefix-aware"),
        replicas=("http://r1", "http://r2", "http://r3", "http://r4"),
    )
    async with harness.client() as client:
        for n in range(8):
            system, question = f"You are helper {n}. " * 40, f"Question {n}?"
            chat = {
                "model": "chat",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            }
            await client.post("/v1/chat/completions", json=chat)
            items = [{"type": "message", "role": "user", "content": question}]
            body = {"model": "chat", "instructions": system, "input": items}
            await client.post("/v1/responses", json=body)
    urls = [url.rsplit("/v1/", 1)[0] for url, _, _ in harness.upstream.calls]
    assert len(urls) == 16
    assert urls[0::2] == urls[1::2]
    assert len(set(urls)) > 1


class _Spy:
    """An app that notes the paths that reach it (past the fast path)."""

    def __init__(self, app: Any) -> None:
        self.app, self.state, self.paths = app, app.state, []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await self.app(scope, receive, send)


async def test_the_fast_path_serves_responses_as_the_route_does(kit: Any) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: (
        Ticking([*_opening("r"), *_output("r")], harness.clock)
        if body.get("stream")
        else kit.reply(body=orjson.dumps(WHOLE))
    )
    spy = _Spy(harness.app)

    async def answers(app: Any) -> list[tuple[int, bytes]]:
        async with kit.asgi_client(app) as client:
            got = [
                await client.post("/v1/responses", json=body)
                for body in (ASK, {**ASK, "stream": True}, {"model": "chat"})
            ]
        return [(a.status_code, a.content) for a in got]

    fast = await answers(ForwardingFastPath(spy))  # type: ignore[arg-type]
    assert spy.paths == []
    assert await answers(harness.app) == fast
    assert [status for status, _ in fast] == [200, 200, 400]
