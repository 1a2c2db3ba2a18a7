"""What a request to an OpenAI endpoint must look like before it is forwarded.

The gateway checks only what it needs (a JSON object with a model name and the
field that holds the prompt) and what it would otherwise misread; everything else,
known or not, goes to the backend untouched for it to judge.
"""

from __future__ import annotations

import enum
import gc
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from citadel.gateway.errors import InvalidRequest
from citadel.gateway.services.responses import (
    FAILED_EVENTS,
    FINAL_EVENTS,
    OPENING_EVENTS,
    chat_view,
)


class Door(enum.StrEnum):
    """The protocol a request came in by (the value is the metric label)."""

    REST = "rest"
    GRPC = "grpc"
    GRAPHQL = "graphql"


class ApiKind(enum.StrEnum):
    """The forwarded endpoints (the value is the metric label)."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


@dataclass(frozen=True)
class ApiCall:
    """One forwarded endpoint: its path on the backend and what it streams."""

    kind: ApiKind
    path: str
    prompt_field: str
    streams: bool
    usage_option: bool = False
    """Its stream carries the usage only when asked (`stream_options`), which
    the gateway then asks for (`client_wants_usage`). A Responses stream
    always ends with it, and has no such option."""
    held: frozenset[str] = frozenset()
    """The stream events a replica sends before it has worked on the request:
    held back and relayed with the first output (`EventFilter`), so that a
    replica that fails during prefill is tried again unseen."""
    closing: frozenset[str] = frozenset()
    """The stream events its stream ends with when complete: one that ends
    after another is broken (a chat's stream needs none: its `[DONE]` tells
    clients nothing they rely on)."""
    typed_events: bool = False
    """Its stream's events are typed (`event:` lines, a `type` in each), so
    the gateway's own error event is typed too (`sse.error_event`)."""


CHAT = ApiCall(ApiKind.CHAT, "/v1/chat/completions", "messages", True, True)
COMPLETIONS = ApiCall(ApiKind.COMPLETIONS, "/v1/completions", "prompt", True, True)
EMBEDDINGS = ApiCall(ApiKind.EMBEDDINGS, "/v1/embeddings", "input", False)
RESPONSES = ApiCall(
    ApiKind.RESPONSES,
    "/v1/responses",
    "input",
    True,
    held=OPENING_EVENTS,
    closing=FINAL_EVENTS | FAILED_EVENTS,
    typed_events=True,
)

MAX_DEPTH = 254
"""How deeply a body's arrays and objects may nest (the body is the first level).

orjson reads 1,024 levels but writes only 254: a deeper body, once read, could
not be written again where the gateway changes it (an alias, a stream's usage
option) or measures it (the token estimate), so it is refused as it is read."""

TOO_DEEP = (
    "The request body is nested too deeply: its arrays and objects may nest "
    f"at most {MAX_DEPTH} levels."
)


# How many items the arrays the gateway walks (to estimate tokens, to route by
# prefix) may hold. The body size alone does not bound that work: 8 MiB of
# `[{}, {}, ...]` is 2.8 million messages, which took seconds of the event loop
# (every other request and stream waited) even for a request then refused with
# a 429. Each limit is far past legitimate use, and at the limits the walk (40
# to 50 ms for 10,000 messages of 2 parts) costs less than reading 8 MiB of
# small arrays at all (about 200 ms, see `_read_json`).
MAX_MESSAGES = 10_000
"""A chat's `messages`: a 128k-token context filled with messages of 13
tokens each (the chat template alone adds about 5 to each)."""

MAX_CONTENT_PARTS = 20_000
"""Content parts of a chat's messages, all together: two for each message at
the limit (clients that always send parts send one or two each)."""

MAX_PROMPTS = 2_048
"""Prompts of one completion or embedding batch: OpenAI's limit on an
embedding's `input`. One prompt of token ids may be as long as the body allows
(a 128k context): the estimate reads its length, never its items."""

MAX_TOOLS = 1_024
"""A chat's `tools` (or `functions`): eight times OpenAI's 128; vLLM renders
each into the prompt with the chat template, in Python."""

MAX_STOP = 64
"""`stop` strings: sixteen times OpenAI's 4; vLLM looks for each in the text
after every token it generates."""

_LISTS = (("tools", MAX_TOOLS), ("functions", MAX_TOOLS), ("stop", MAX_STOP))
"""The optional arrays of any endpoint, with their limits."""

_COUNTS = ("max_tokens", "max_completion_tokens", "n", "best_of")
"""The numbers the token estimate reads: each, when set, a positive integer
(an estimate that skipped a `best_of` of "64" or 64.0, which vLLM reads as 64,
charged one sequence for 64)."""

_RESPONSE_COUNTS = ("max_output_tokens",)
"""The one number the estimate reads of a Responses request (the others are
no fields of it: vLLM ignores them, so the gateway does not judge them)."""


@dataclass(frozen=True)
class ParsedBody:
    """A request body as `parse_body` read and checked it, and as it goes to
    the backend."""

    body: dict[str, Any]
    """The client's body."""
    stream: bool
    """Whether the answer streams: the endpoint can, and `stream` is true."""
    sent: dict[str, Any]
    """The body for the backend under the client's model name: the client's,
    with the usage chunk asked for on a stream that carries it only when
    asked (see `ApiCall.usage_option` and `client_wants_usage`)."""
    written: bytes
    """`sent` as JSON: the bytes the client sent when it is the client's body."""

    def upstream(self, served_name: str) -> bytes:
        """The body for the backend: `sent`, with the served model name. The
        bytes the client sent when nothing changes; none are written again
        unless the client named the model by an alias."""
        if self.body["model"] == served_name:
            return self.written
        return dumps_request({**self.sent, "model": served_name})


NOT_AN_OBJECT = "The request body must be a JSON object."
"""What every door answers (400) for a JSON body that is no object."""


def unparsable(err: Exception, where: str = "body") -> InvalidRequest:
    """The 400 every door answers for JSON it cannot read (`where`: the body,
    or GraphQL's query string), saying why."""
    return InvalidRequest(
        f"We could not parse the JSON {where} of your request: {err}."
    )


def parse_body(raw: bytes, call: ApiCall) -> ParsedBody:
    """The request body, checked just enough to route it.

    Raises:
        InvalidRequest: malformed JSON, a missing or mistyped field, or an
            array longer than the gateway reads (`MAX_MESSAGES` and others).
    """
    try:
        body = _read_json(raw)
    except orjson.JSONDecodeError as err:
        raise unparsable(err) from err
    if not isinstance(body, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    stream = call.streams and body.get("stream") is True
    sent = _usage_asked(body) if stream and call.usage_option else body
    # Writing it is the depth check: in C, about 4 us for a 20 KB chat (a fifth
    # of the read), where a walk in Python takes 35 us. What orjson reads it
    # fails to write only past MAX_DEPTH (numbers past 64 bits it reads as
    # floats, and it refuses lone surrogates), so nothing needs a walk. What it
    # writes is what the backend gets, so that a stream, to which the gateway
    # adds the usage option, is written once (parse and upstream body of a 20
    # KB chat: 22.2 us, 20.2 us with one write). That nests as deeply as the
    # body, unless the option it replaces is no object: that may be what nests
    # too deeply, and the body is written as well.
    if sent is body:
        dumps_request(body)
        written = raw
    else:
        if not isinstance(body.get("stream_options"), dict | None):
            dumps_request(body)
        written = dumps_request(sent)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "You must provide a model parameter (a string).", param="model"
        )
    prompt = body.get(call.prompt_field)
    if call.kind is ApiKind.CHAT:
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest(
                "`messages` must be a non-empty array of messages.", param="messages"
            )
        check_length("messages", len(prompt), MAX_MESSAGES)
        _check_messages(prompt)
    elif call.kind is ApiKind.RESPONSES:
        _check_input(body)
    elif not isinstance(prompt, str | list):
        raise InvalidRequest(
            f"`{call.prompt_field}` must be a string or an array.",
            param=call.prompt_field,
        )
    elif isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        # A batch: the estimate walks it. Token ids (integers throughout, the
        # first tells, as for the estimate) are one prompt.
        check_length(call.prompt_field, len(prompt), MAX_PROMPTS)
    for field, limit in _LISTS:
        value = body.get(field)
        if isinstance(value, list):
            check_length(field, len(value), limit)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("`stream` must be a boolean.", param="stream")
    counts = _RESPONSE_COUNTS if call.kind is ApiKind.RESPONSES else _COUNTS
    for field in counts:
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"`{field}` must be a positive integer.", param=field)
    return ParsedBody(body, stream, sent, written)


def prompt_body(body: Mapping[str, Any], call: ApiCall) -> Mapping[str, Any]:
    """`body` as what reads a prompt (the token estimate, prefix-aware
    routing) reads it: a Responses request as the chat it stands for
    (`chat_view`), any other as it is."""
    return chat_view(body) if call.kind is ApiKind.RESPONSES else body


def dumps_request(body: dict[str, Any]) -> bytes:
    """`body` as JSON bytes, for any door.

    Raises:
        InvalidRequest: it cannot be written: nested deeper than `MAX_DEPTH`,
            or (from a door other than REST's) an integer past 64 bits.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as err:
        # orjson's word for depth; any other failure keeps its own words.
        if "recursion" in str(err).lower():
            raise InvalidRequest(TOO_DEEP) from err
        raise InvalidRequest(f"The request cannot be sent as JSON: {err}.") from err


def _read_json(raw: bytes) -> Any:
    """`raw` parsed, without the cyclic garbage collector running meanwhile.

    orjson makes every array and object of the body, each tracked by the
    collector, whose passes (one per 700 new ones, the older generations among
    them) made reading 8 MiB of `[[], [], ...]` take 1.3 s instead of 0.17 s.
    Parsed JSON holds no cycles, so they would find nothing; the one pass that
    follows sees the body once. orjson holds the GIL throughout, so no other
    thread runs without the collector.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(raw)
    finally:
        if was_enabled:
            gc.enable()


def check_length(field: str, length: int, limit: int) -> None:
    """Refuses an array longer than `limit` (before anything walks it).

    Raises:
        InvalidRequest: it is longer, naming `field` and the limit.
    """
    if length > limit:
        raise InvalidRequest(
            f"`{field}` has {length:,} items; at most {limit:,} are allowed.",
            param=field,
        )


def _check_messages(messages: list[Any], field: str = "messages") -> None:
    """Refuses a message (or a Responses input item, `field` "input") that is
    no object, and messages with more than `MAX_CONTENT_PARTS` content parts
    in all (counted by their arrays' lengths, in the same pass over at most
    `MAX_MESSAGES`)."""
    parts = 0
    for message in messages:
        if not isinstance(message, dict):
            what = "message" if field == "messages" else "input item"
            raise InvalidRequest(f"Each {what} must be an object.", param=field)
        content = message.get("content")
        if isinstance(content, list):
            parts += len(content)
    if parts > MAX_CONTENT_PARTS:
        raise InvalidRequest(
            f"`{field}` have {parts:,} content parts in all; at most "
            f"{MAX_CONTENT_PARTS:,} are allowed.",
            param=field,
        )


def _check_input(body: dict[str, Any]) -> None:
    """Checks what a Responses request's estimate and routing read: `input`, a
    string (one user message) or an array of items (messages, function calls
    and their outputs, reasoning), walked as a chat's messages are and bounded
    as they are; `instructions`, a string if set. An empty array goes on, for
    the backend to judge (with `previous_response_id` it may mean something).
    """
    items = body.get("input")
    if isinstance(items, list):
        check_length("input", len(items), MAX_MESSAGES)
        _check_messages(items, "input")
    elif not isinstance(items, str):
        raise InvalidRequest(
            "`input` must be a string or an array of input items.", param="input"
        )
    if not isinstance(body.get("instructions"), str | None):
        raise InvalidRequest("`instructions` must be a string.", param="instructions")


_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
"""What a client's request or session id may be for the gateway to log and
forward it as sent (matched whole: `re.match` with `$` let a newline end it)."""


def request_id(value: str | None) -> str:
    """The client's request id (`x-request-id`) when it is sane, else a new
    one: it goes into every log line and to the replica as sent."""
    return value if value and _ID.fullmatch(value) else uuid.uuid4().hex


def session_id(value: str | None) -> str | None:
    """The session header's value as the gateway routes and logs it.

    As sent when it looks like an id (1 to 128 letters, digits and `._:/+=-`,
    as a request id); else `sha256:` and the hex SHA-256 of its UTF-8 bytes,
    which pins the conversation as well, so a client is never refused for the
    header of an optional feature. Either way what reaches the log is bounded
    and cannot forge a field of a text log line (`x key=root status=200`), and
    session affinity hashes at most 128 characters per replica, not 4 MB.
    None when absent or empty (no session).
    """
    if not value:
        return None
    if _ID.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest}"


def client_wants_usage(body: dict[str, Any]) -> bool:
    """True when a streaming client asked for the usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage_asked(body: dict[str, Any]) -> dict[str, Any]:
    """A stream's `body` asking for the usage chunk, which the gateway reads
    (and keeps from a client that did not ask for it); `body` itself when the
    client asked. Other stream options are kept."""
    if client_wants_usage(body):
        return body
    options = body.get("stream_options")
    return {
        **body,
        "stream_options": {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        },
    }
