"""Server-sent events on the streaming path: cut at event boundaries, read usage.

The relay forwards every complete event the moment its last byte arrives; only a
partial event at the end of a network chunk waits for the rest. Events are parsed
only when they mention usage or an error, so an ordinary token chunk, once the
answer began, costs four byte searches (a CR, the last event end, the usage and
error marks): about 1.0 us per chunk (timeit, a 190-byte chat chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from citadel.gateway.services.responses import FAILED_EVENTS, FINAL_EVENTS

EVENT_END = b"\n\n"
USAGE_MARK = b'"usage"'
ERROR_MARK = b'"error"'
MAX_HELD_EVENTS = 8
"""Opening events held back at most (vLLM sends two)."""
MAX_HELD_BYTES = 64 * 1024
"""Bytes of opening events held back at most (vLLM 0.32's two came to 1,498
bytes for a short request, captured from the CPU vLLM with SmolLM2)."""


@dataclass(frozen=True)
class Usage:
    """Token counts from a response's `usage` object."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def usage_of(payload: Any) -> Usage | None:
    """The usage in a parsed response or chunk, if it has one: its `usage`,
    or a Responses stream's final event's (`FINAL_EVENTS`), in its `response`;
    counted in `prompt_tokens` and `completion_tokens`, or as the Responses
    API counts, `input_tokens` and `output_tokens`."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if usage is None and payload.get("type") in FINAL_EVENTS:
        response = payload.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    completion = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def error_of(payload: Any) -> dict[str, Any] | None:
    """`payload` when it is an error event's (OpenAI's error object, which vLLM
    writes into a stream whose generation failed, or a Responses stream's
    `error` or `response.failed` event), else None."""
    if not isinstance(payload, dict):
        return None
    if "error" in payload and "choices" not in payload:
        return payload
    return payload if payload.get("type") in FAILED_EVENTS else None


def usage_of_body(body: bytes) -> Usage | None:
    """The usage in a whole (non-streamed) JSON response."""
    if USAGE_MARK not in body:
        return None
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


class EventFilter:
    """Cuts a byte stream into complete SSE events, notes the usage and the
    first error event they carry, and drops the usage-only chunk when the client
    did not ask for it.

    Events of the `held` types (a Responses stream's `response.created` and
    `response.in_progress`, which vLLM sends before prefill) that come before
    any other are held back, and given out with the first other one: what
    `feed` first gives out is the first output, from a replica that got
    through prefill.

    At most `MAX_HELD_EVENTS` events or `MAX_HELD_BYTES` are held: a replica
    that sends more opening events than that is relayed from there on.

    Args:
        keep_usage_chunk: False when the gateway added `include_usage` itself.
        held: the types of the opening events to hold back (by an event's
            `event:` field, else its data's `type`).
        closing: the types of the events a complete stream ends with (a
            Responses stream's); `ended` says whether the last one was.
    """

    def __init__(
        self,
        keep_usage_chunk: bool,
        held: frozenset[str] = frozenset(),
        closing: frozenset[str] = frozenset(),
    ) -> None:
        self._keep = keep_usage_chunk
        self._held = held
        self._holding = True
        """No output came yet: what came (blank events, a lone `[DONE]`, the
        `held` types) waits for it."""
        self.began: bool = False
        """An event with data (not `[DONE]`) was given out: the answer began.
        A comment given out first (a keep-alive) does not make it so."""
        self.first_error: dict[str, Any] | None = None
        """The payload of the first event with data when it was an error
        (`error_of`): the stream began with the server's error."""
        self._opening: list[bytes] = []
        """The held events, as they came."""
        self._opening_bytes = 0
        self._opened = 0
        """Held events with data (the `held` types)."""
        self._closing = closing
        self._last_typed = b""
        """The last complete event that has a type (not a comment, a blank
        event or `[DONE]`), noted only when `closing` is set."""
        self._buffer = b""
        self._cr = False
        """The last chunk ended with a CR, which a LF may complete."""
        self.usage: Usage | None = None
        self.error: dict[str, Any] | None = None
        """The first error event's payload (`error_of`), relayed as is."""
        self.count = 0
        """Complete events seen (each of vLLM's carries a token or more, but the
        first and the usage chunk)."""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in `chunk` (with any earlier partial one).

        Lines that end in CR LF or CR, which SSE allows and vLLM does not
        send, are relayed ending in LF: events are cut at blank lines."""
        # Each check on this path runs for every chunk of every stream.
        if self._cr or b"\r" in chunk:
            chunk = self._lf(chunk)
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(EVENT_END)
        if end < 0:
            self._buffer = data
            return b""
        cut = end + len(EVENT_END)
        complete, self._buffer = data[:cut], data[cut:]
        self.count += complete.count(EVENT_END)
        if self._holding or self._closing or not self.began:
            if self._closing:
                self._note_last(complete)
            if self._holding:
                after = self._past_opening(complete)
                if after is None:
                    return b""
                if not self.began:
                    self._note_beginning(after)
                return self._filter(self._release_opening() + after)
            if not self.began:
                self._note_beginning(complete)
            return self._filter(complete)
        if USAGE_MARK not in complete and ERROR_MARK not in complete:
            return complete  # as `_filter` would: a token chunk, unparsed
        return self._filter(complete)

    def _lf(self, chunk: bytes) -> bytes:
        """`chunk` with its lines ending in LF (the part before it was)."""
        if not chunk:
            return chunk
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CR LF cut between two chunks
        self._cr = chunk.endswith(b"\r")
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def rest(self) -> bytes:
        """Whatever followed the last complete event (sent as is at the end),
        after any opening events still held."""
        rest, self._buffer = self._release_opening() + self._buffer, b""
        return rest

    def finish(self) -> bytes:
        """What is left at the end of the body: as `rest`, but for a stream
        with `closing` events a last event without its blank line is taken
        as complete (its type, usage and error read) when its data is whole,
        and dropped when cut off (as an SSE client drops it), so that what
        the relay writes after it is an event of its own."""
        # A CR that ended the body was an LF already: the LF added here is
        # no half of a CR LF.
        self._cr = False
        if self._closing and self._buffer.strip():
            if _data_of(self._buffer) is None:
                self._buffer = b""
            else:
                tail = b"\n" if self._buffer.endswith(b"\n") else EVENT_END
                return self.feed(tail) + self.rest()
        return self.rest()

    def next_sequence(self) -> int:
        """The `sequence_number` an event appended to the stream takes: one
        past the last typed event's, else the count of events."""
        payload = _data_of(self._last_typed) if self._last_typed else None
        number = payload.get("sequence_number") if isinstance(payload, dict) else None
        if isinstance(number, int) and not isinstance(number, bool):
            return number + 1
        return self.count

    def _note_last(self, complete: bytes) -> None:
        """Notes the last event of `complete` that has a type, from the end
        (a stream may end with `[DONE]`, a comment or a blank event)."""
        end = len(complete) - len(EVENT_END)
        while end >= 0:
            before = complete.rfind(EVENT_END, 0, end)
            start = before + len(EVENT_END) if before >= 0 else 0
            event = complete[start:end]
            if event.strip() and _type_of(event) is not None:
                self._last_typed = event
                return
            if before < 0:
                return
            end = before

    @property
    def holding(self) -> bool:
        """Whether every event so far was an opening one, held back (or
        none came)."""
        return self._holding

    @property
    def ended(self) -> bool:
        """Whether the stream's last complete event is one it may end with:
        always, for a stream with no `closing` events."""
        return not self._closing or _type_of(self._last_typed) in self._closing

    def _release_opening(self) -> bytes:
        if not self._opening:
            return b""
        opening = b"".join(self._opening)
        self._opening.clear()
        self._opening_bytes = 0
        return opening

    def _past_opening(self, complete: bytes) -> bytes | None:
        """The complete events from the first output on (ending holding), the
        ones before it held; None while all are.

        Held, in any stream: events without data nor comment (blank ones, a
        `[DONE]`, an `id:` alone: no output, a replica that sends nothing
        else did no work), and the `held` types (at most `MAX_HELD_EVENTS`).
        Anything else is output, a comment too:
        a keep-alive is sent to keep the connections in front alive through
        a long wait, so it goes at once, committing the stream (a failure
        after it is no longer tried again unseen). Past `MAX_HELD_BYTES` held,
        the event that would exceed it is relayed as if it were output."""
        start = 0
        while start < len(complete):
            found = complete.find(EVENT_END, start)
            # Past the last event, only the blank line `feed` cut after.
            end = found + len(EVENT_END) if found >= 0 else len(complete)
            event = complete[start:end]
            size = self._opening_bytes + end - start
            if size > MAX_HELD_BYTES:
                break
            if _has_data(event):
                if (
                    not self._held
                    or self._opened >= MAX_HELD_EVENTS
                    or _type_of(event) not in self._held
                ):
                    break
                self._opened += 1
            elif _is_comment(event):
                break  # a keep-alive: output
            self._opening.append(event)
            self._opening_bytes = size
            start = end
        else:
            return None
        self._holding = False
        return complete[start:]

    def _note_beginning(self, complete: bytes) -> None:
        """Notes whether an event of `complete` has data and is none of the
        `held` types (the answer began) and, for the first, whether it is an
        error."""
        for event in complete.split(EVENT_END):
            if _has_data(event) and (
                not self._held or _type_of(event) not in self._held
            ):
                self.began = True
                if ERROR_MARK in event:  # parsed only when it may be one
                    self.first_error = error_of(_data_of(event))
                return

    def _filter(self, complete: bytes) -> bytes:
        """`complete` events without a usage-only chunk not asked for, noting
        usage and errors."""
        if USAGE_MARK not in complete and ERROR_MARK not in complete:
            return complete
        events = complete.split(EVENT_END)
        kept = [e for e in events[:-1] if self._keep_event(e)]
        return b"".join(e + EVENT_END for e in kept)

    def _keep_event(self, event: bytes) -> bool:
        if USAGE_MARK not in event and ERROR_MARK not in event:
            return True
        # Parsed, not judged by the mark alone: a token may be the word itself
        # (`"token":"error"` in logprobs), or a chunk may carry both.
        payload = _data_of(event)
        if self.error is None:
            self.error = error_of(payload)
        usage = usage_of(payload)
        if usage is None:
            return True
        self.usage = usage
        usage_only = isinstance(payload, dict) and payload.get("choices") == []
        return self._keep or not usage_only


def _has_data(event: bytes) -> bool:
    """Whether an event has a data field (`data: ...`, or a bare `data`,
    which SSE reads as empty data) other than `[DONE]`, not only comments
    and other fields."""
    if b"data" not in event:
        return False
    return any(
        line == b"data" or (line.startswith(b"data:") and line[5:].strip() != b"[DONE]")
        for line in event.split(b"\n")
    )


def _is_comment(event: bytes) -> bool:
    """Whether an event holds a comment (a line that starts with a colon)."""
    return event.startswith(b":") or b"\n:" in event


def _type_of(event: bytes) -> str | None:
    """An event's type: its last `event:` field, as SSE reads it, else (none,
    an empty one or `message`, SSE's default: no type) its data's `type`,
    which the openai client reads."""
    for line in reversed(event.split(b"\n")):
        if line.startswith(b"event:"):
            field = line[6:].strip()
            if field and field != b"message":
                return field.decode(errors="replace")
            break
    payload = _data_of(event)
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def _data_of(event: bytes) -> Any:
    """The JSON of an event's `data:` lines, or None."""
    lines = [
        line[5:].strip()
        for line in event.split(b"\n")
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
    ]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def error_event(body: dict[str, Any], sequence: int | None = None) -> bytes:
    """An SSE event carrying an error object (sent when a stream breaks off).

    With a `sequence` number, as a Responses stream's `error` event (OpenAI's
    `ResponseErrorEvent`): `event: error`, and the error's `code`, `message`
    and `param` beside `"type": "error"` and `sequence_number`, where clients
    that read events by type look for them, the error object kept too, where
    the openai client looks (it raises it as an `APIError`).
    """
    if sequence is None:
        return b"data: " + orjson.dumps(body) + EVENT_END
    error = body.get("error")
    fields = error if isinstance(error, dict) else {}
    payload = {
        "type": "error",
        "code": fields.get("code"),
        "message": fields.get("message"),
        "param": fields.get("param"),
        "sequence_number": sequence,
        **body,
    }
    return b"event: error\ndata: " + orjson.dumps(payload) + EVENT_END
