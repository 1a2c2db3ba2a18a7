"""Prompt prefixes as chains of block hashes, for prefix-aware routing.

The text a model sees first (the system prompt, then the conversation so far) is cut
into blocks of `BLOCK_CHARS` characters; each block's hash covers every block before
it, like vLLM's prefix cache, so two requests share a hash exactly when they share
that whole prefix. Hashes are stable across processes (no per-process seed), so
every gateway replica routes the same prefix the same way.

The hashes are xxh3 (64 bits) of the whole prefix up to each block's end, taken
from one running hash state: they only pick replicas, and a 20 KB prompt's 64
blocks hash in 11 us this way against 61 us with a blake2b per block, on the path
of every request.

What is hashed for a chat (`prefix_text`) is what the backend's prefix cache
tells prompts apart by, not just the messages' text: the chat template writes
the tool schemas at the head of the prompt, and a media part's place in the KV
cache is keyed by a hash of the media, so the tools come first and each media
part stands in its place as a hash of its payload.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any

import orjson
import xxhash

BLOCK_CHARS = 256
MAX_BLOCKS = 64
_HASHED_CHARS = BLOCK_CHARS * MAX_BLOCKS
"""Characters of a prompt `block_hashes` can read at most: each encodes to one
byte or more, so this many hold the hashed bytes whatever they are."""

_LONG_CHARS = 4 * _HASHED_CHARS
"""A text longer than this is cut to what is hashed before it is written."""

TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
"""The content part types vLLM reads as text, not media."""

_MEDIA_PAYLOADS = ("url", "data", "file_data", "file_id")
"""The fields of a media part's object that name or hold the media: `url`
(`image_url`, `audio_url`, `video_url`; a data URL holds the media itself),
`data` (`input_audio`), `file_data` and `file_id` (`file`)."""

_PART_PAYLOADS = ("image_url", "file_url", "file_data", "file_id")
"""The fields of a Responses media part that name or hold the media, a string
at the part's top level (`input_image`, `input_file`)."""


def prompt_text(body: Mapping[str, Any]) -> str:
    """The prompt of a chat, completion or embedding request, as one string."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(
            _message_text(message, _content(message.get("content")))
            for message in messages
            if isinstance(message, Mapping)
        )
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            return _first_prompt(value[0])
    return ""


def _first_prompt(value: object) -> str:
    """The text of a batch's first prompt (or a token-id prompt's first id):
    of token ids, only as many as the hashed blocks can hold (each id writes
    at least one character), so a prompt of a million ids is not written out
    whole; nothing for a shape the backend refuses."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        ids = value[: BLOCK_CHARS * MAX_BLOCKS]
        if all(isinstance(i, int) for i in ids):
            return str(ids)
    return ""


def _message_text(message: Mapping[str, Any], content: str) -> str:
    """A message as the prompt texts write it: its role, then `content`."""
    # Only a string is a role (vLLM refuses any other): str() of anything else
    # could be megabytes of text, made for nothing.
    role = message.get("role")
    role = role if isinstance(role, str) else None
    return f"{role}\x1f{content}\x1e"


def _no_text(part: Mapping[str, Any]) -> str:
    """Nothing, for a part without `text` (media: its payload, base64, is no
    text to charge by)."""
    return ""


def _content(
    content: object,
    limit: int = sys.maxsize,
    media: Callable[[Mapping[str, Any]], str] = _no_text,
) -> str:
    """A message's content as text: a string as it is, or its parts' text
    (vLLM takes a plain string among them as text) with `media` of each part
    without text; parts cut past `limit` characters."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces: list[str] = []
    for part in content:
        if limit <= 0:
            break
        if isinstance(part, str):
            text = part
        elif isinstance(part, Mapping):
            text = _text(part["text"]) if "text" in part else media(part)
        else:
            continue
        if len(text) > limit:
            text = text[:limit]
        pieces.append(text)
        limit -= len(text)
    return "".join(pieces)


def _text(value: object) -> str:
    """A part's `text`: only a string (vLLM refuses any other), never str() of
    a value that could be megabytes of JSON."""
    return value if isinstance(value, str) else ""


def prefix_text(body: Mapping[str, Any]) -> str:
    """The start of a request's prompt as the backend's prefix cache tells
    prompts apart, for `block_hashes`.

    For a chat: the canonical JSON of its `tools` (sorted keys, compact)
    first, as most chat templates (Llama 3, Qwen 2.5, Hermes) write the schemas
    at the head of the prompt, so agents sharing a tool set meet on a replica
    and another tool set is another prefix from the first block (Mistral's
    write them before the last user message: there the tools split prefixes
    that only later differ); `functions`, OpenAI's older name, vLLM does not
    read, so they are no part of its prompt;
    then the messages as `prompt_text` writes them, except that each media
    part stands in its place as the hash of its payload (vLLM keys a media
    part's blocks by a hash of the media, so two images are two prefixes,
    however alike the text around them). Only the first `MAX_BLOCKS` blocks
    are ever hashed, so no more text than they hold is written: a megabyte of
    tools costs no megabyte of text. A chat without tools or media hashes as
    its `prompt_text` does; any other request is its `prompt_text`.
    """
    return prefix_window(body)[0]


def prefix_window(body: Mapping[str, Any]) -> tuple[str, int]:
    """`prefix_text`, and how many of a chat's messages start within the bytes
    `block_hashes` reads (0 for any other request): a message past them is no
    part of the prefix the hashed window names."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return prompt_text(body), 0
    pieces: list[str] = []
    written = 0
    # Where the next message starts, in the UTF-8 bytes `block_hashes` reads.
    start = 0
    # The characters still to write: as many as the bytes still to hash, as
    # each character is a byte or more.
    left = _HASHED_CHARS
    if body.get("tools") is not None:
        tools = _tools_json(body["tools"], left)
        pieces.append(tools.decode(errors="ignore"))
        left -= len(tools)
        start = len(tools)
    for message in messages:
        if left <= 0:
            break
        written += start < _HASHED_CHARS
        if isinstance(message, Mapping):
            content = message.get("content")
            if not isinstance(content, str):
                content = _content(content, left, _stand_in)
            elif len(content) > _LONG_CHARS:
                # A slice is a copy: worth it only where it saves much more.
                content = content[:left]
            text = _message_text(message, content)
            pieces.append(text)
            left -= len(text)
            if start < _HASHED_CHARS:
                start += len(text.encode(errors="surrogatepass"))
    return "".join(pieces), written


def _tools_json(tools: object, limit: int) -> bytes:
    """The canonical JSON of a chat's `tools`, an array and a separator, or
    nothing when there are none; cut a few bytes past `limit` bytes.

    Each schema is written once, in C, and none after the ones that fill
    `limit`: 50 schemas of 2 KB cost the nine that fill the hashed blocks.
    The body was written whole when it was read (`parse_body`), so no schema
    nests too deeply to write.
    """
    schemas: list[bytes] = []
    size = 0
    for schema in tools if isinstance(tools, list) else [tools]:
        if size > limit:
            break
        if schema is not None:
            schemas.append(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
            size += len(schemas[-1]) + 1
    if not schemas:
        return b""
    # Three bytes more than `limit`, as orjson writes UTF-8: the cut can split
    # only the last character, which decoding drops, and leaves `limit` bytes.
    return (b"[" + b",".join(schemas) + b"]\x1d")[: limit + 3]


def _stand_in(part: Mapping[str, Any]) -> str:
    """A part without `text`: nothing for a text type without it (as
    `_no_text`), else a media part's stand-in, the hex xxh3 of its payload
    between separators.

    The payload is hashed as bytes, never put in the text: a base64 image may
    be megabytes. vLLM takes the part's `uuid`, when the client names one, as
    the media's identity in its cache instead of the media's hash, and a part
    without `type` by its one other field.
    """
    kind = part.get("type")
    if isinstance(kind, str) and kind in TEXT_PARTS:
        return ""
    payload = part.get("uuid")
    if not isinstance(payload, str):
        payload = part.get(kind) if isinstance(kind, str) else None
        if payload is None:
            # A Responses part holds its media in a field named otherwise
            # than its type (`input_image`'s `image_url`), maybe after
            # another (its `detail`).
            payload = next(
                (part[k] for k in _PART_PAYLOADS if isinstance(part.get(k), str)),
                None,
            )
        if payload is None:
            payload = next(
                (v for k, v in part.items() if k not in ("type", "uuid")), None
            )
        if isinstance(payload, Mapping):
            payload = next(
                (
                    payload[k]
                    for k in _MEDIA_PAYLOADS
                    if isinstance(payload.get(k), str)
                ),
                payload,
            )
    data = (
        payload.encode()
        if isinstance(payload, str)
        # Any other shape (embeddings, a part vLLM will refuse): all of it, in
        # C; it nests no deeper than the body, which `parse_body` wrote.
        else orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    )
    return f"\x1c{xxhash.xxh3_64_hexdigest(data)}\x1c"


def block_hashes(
    text: str, block_chars: int = BLOCK_CHARS, *, adapter: str | None = None
) -> list[int]:
    """Chained hashes of the prompt's full blocks (and of a short prompt whole).

    Only complete blocks count, like a KV cache; a prompt shorter than one block is
    hashed whole so it still has an identity.

    Args:
        adapter: the LoRA adapter the request names, if any. vLLM's prefix
            cache keeps an adapter's blocks apart from the base model's and
            every other adapter's (its block hashes include the LoRA), so the
            same prompt is another chain of hashes under each adapter: the
            hash is seeded by the adapter's name. The base model's hashes are
            unseeded, as they were before adapters, so its placements stay.
    """
    data = memoryview(text.encode())
    size = block_chars
    count = min(len(data) // size, MAX_BLOCKS) or (1 if data else 0)
    state = xxhash.xxh3_64(seed=_adapter_seed(adapter) if adapter else 0)
    # intdigest() leaves the state as it is, so one pass over the prompt gives the
    # hash of every prefix in turn.
    update, digest = state.update, state.intdigest
    hashes: list[int] = []
    for start in range(0, count * size, size):
        update(data[start : start + size])
        hashes.append(digest())
    return hashes


def _adapter_seed(adapter: str) -> int:
    """The seed of an adapter's block hashes: never 0, the base model's."""
    return xxhash.xxh3_64_intdigest(b"lora\x1f" + adapter.encode()) or 1


Mark = tuple[int, int, int]
"""Where a prompt ends (`prompt_mark`): a length and the hashes of what ends it."""

_TAIL_CHARS = BLOCK_CHARS
"""Characters before a prompt string's end that its mark hashes."""

_MESSAGE_CHARS = 8192
"""A message's text longer than this is hashed by its length, its first and its
last `_MESSAGE_CHARS // 2` characters (`_message_hash`)."""


def prompt_mark(body: Mapping[str, Any], *, in_window: int) -> Mark | None:
    """Where a request's prompt ends, so that a later request can be told to
    continue it (`continues`): the same conversation, longer by a turn or more,
    or the same request again.

    For a chat: its number of messages, the hash of the last one and, when the
    one before it is the assistant's and both it and the one before it are
    past the first `in_window` messages (`prefix_window`), the hash of those
    two (else 0): a pair within the hashed window is one every request of
    the window may share (a few-shot prompt's example, an agent's preamble),
    and would make another conversation look continued; for a
    prompt string: its length and the hash of its last `BLOCK_CHARS`
    characters. None for anything else (a batch, token ids, an empty chat).
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        if not messages:
            return None
        before = 0
        pair = len(messages) - 3
        if pair >= max(in_window, 0) and _role(messages[-2]) == "assistant":
            before = _exchange_hash(messages[-3], messages[-2])
        return len(messages), _message_hash(messages[-1]), before
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return len(prompt), _text_hash(prompt[-_TAIL_CHARS:]), 0
    return None


def continues(body: Mapping[str, Any], mark: Mark) -> bool:
    """Whether the request's prompt starts with the prompt `mark` was taken
    of, as far as the mark tells: the message that ended that one is where it
    ended it, or the assistant's message before it is where it was, with the
    message before that one (or, for a prompt string, the characters that
    ended it).

    A chat that sends its whole history at each turn continues its last
    turn; a turn of another conversation that shares the hashed window (a
    long system prompt or tool set) does not, unless its messages there are
    the same ones. The assistant's message counts too because clients change
    the last message of a turn when they send it again: retrieved context or
    a `cache_control` marker kept on the newest message only, old screenshots
    dropped, the message edited; the answer before it they send back as it
    came. Only the assistant's: the message before a first question is a
    system prompt, or a user's, that other conversations share; and with the
    question it answered, as two conversations may get the same answer (a
    greeting, a template's) at the same turn.
    """
    count, last, before = mark
    if count < 1:
        return False
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) < count:
            return False
        if _message_hash(messages[count - 1]) == last:
            return True
        return bool(before) and (
            _exchange_hash(messages[count - 3], messages[count - 2]) == before
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        tail = prompt[max(0, count - _TAIL_CHARS) : count]
        return len(prompt) >= count and _text_hash(tail) == last
    return False


def _role(message: object) -> object:
    return message.get("role") if isinstance(message, Mapping) else None


def _exchange_hash(question: object, answer: object) -> int:
    """The identity of two messages in a row."""
    pair = struct.pack("<QQ", _message_hash(question), _message_hash(answer))
    return xxhash.xxh3_64_intdigest(pair)


def _text_hash(text: str) -> int:
    """xxh3 of `text` in UTF-8 (a lone surrogate, which JSON may carry, as
    it is)."""
    return xxhash.xxh3_64_intdigest(text.encode(errors="surrogatepass"))


def _message_hash(message: object) -> int:
    """A message's identity: xxh3 of its JSON with sorted keys, written in C
    (the body was written whole when it was read, so it nests no deeper than
    orjson writes); a string content longer than `_MESSAGE_CHARS` (a pasted
    document) stands in as its length and its two ends. Long strings elsewhere
    (a text part, a tool call's arguments) are written whole: at most the 8
    MiB body, some 3 ms, less than reading the body cost; a walk of the
    message in Python to bound them cost every message 3 to 15 times more
    (a 20,000-part message 12.6 ms against 0.86)."""
    if isinstance(message, Mapping):
        content = message.get("content")
        if isinstance(content, str) and len(content) > _MESSAGE_CHARS:
            half = _MESSAGE_CHARS // 2
            ends = f"{len(content)}\x1f{content[:half]}\x1f{content[-half:]}"
            message = {**message, "content": ends}
    return xxhash.xxh3_64_intdigest(orjson.dumps(message, option=orjson.OPT_SORT_KEYS))


def rendezvous(key: str | int, urls: list[str]) -> str:
    """The URL with the highest hash for `key` (stable when others come and go)."""

    def weight(url: str) -> bytes:
        return hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest()

    return max(urls, key=weight)


class BlockTable:
    """Block hash -> bit mask of the replicas it was sent to, in flat arrays.

    A hash may live in one of two slots, named by two slices of its bits, and
    takes whichever is free; when both are taken it displaces the first one's
    hash: past its size the table forgets at random rather than strictly the
    least recently used (two choices and a move keep displacements rare until
    then: fed 100,000 random hashes, 8 at a time, it held 99.7% of them at the
    end). That costs routing little: a
    conversation's every request writes its blocks again, so a lost one is
    back at the next turn, and the longest known prefix still wins. What it
    buys is weight and steadiness: 16 bytes a slot, where an LRU dictionary of
    Python ints held ~200 bytes a hash (41 MiB at 200,000 hashes, and its
    resizes under churn kept RSS growing for a while after it was full); here
    the arrays stop growing at `max_slots` and then only their values change.

    The arrays start small and double while more than a quarter of the slots
    are taken, up to `max_slots`, so an idle model's table weighs 16 KiB.
    Masks are 64-bit integers until `widen` makes them Python ints, for models
    that use more than 64 replica bits at once.

    Args:
        max_slots: slots at most, a power of two.
    """

    _FIRST_SLOTS = 1024

    def __init__(self, max_slots: int) -> None:
        if max_slots < 1 or max_slots & (max_slots - 1):
            raise ValueError(f"max_slots must be a power of two, not {max_slots}")
        self._max_slots = max_slots
        self._wide = False
        self._allocate(min(self._FIRST_SLOTS, max_slots))

    def _allocate(self, slots: int) -> None:
        self._keys = array("Q", bytes(8 * slots))
        self._masks: MutableSequence[int] = (
            [0] * slots if self._wide else array("Q", bytes(8 * slots))
        )
        self._slot = slots - 1
        self._used = 0

    @property
    def width(self) -> int:
        """How many replica bits a mask holds."""
        return sys.maxsize if self._wide else 64

    def __len__(self) -> int:
        """Hashes held (slots with a mask)."""
        return self._used

    @property
    def slots(self) -> int:
        """Slots allocated now."""
        return self._slot + 1

    def owners(self, block: int) -> int:
        """The mask of `block`, 0 if it is not held."""
        keys, masks, slot = self._keys, self._masks, self._slot
        i = block & slot
        if keys[i] == block and masks[i]:
            return masks[i]
        i = (block >> 32) & slot
        return masks[i] if keys[i] == block else 0

    def add(self, blocks: Sequence[int], bit: int) -> list[int]:
        """Records that `blocks` were sent to the replica of `bit`; returns
        those it was not known to hold (a few may have been: a hash in its
        second slot is not looked for there, to keep the common case short)."""
        keys, masks, slot, put = self._keys, self._masks, self._slot, self._put
        fresh: list[int] = []
        for block in blocks:
            i = block & slot
            # Most of a conversation's blocks were sent to this replica before.
            if not (keys[i] == block and masks[i] & bit):
                put(block, bit)
                fresh.append(block)
        if self._used * 4 > self._slot + 1 and self._slot + 1 < self._max_slots:
            self._grow()
        return fresh

    def _put(self, block: int, bit: int) -> None:
        keys, masks, slot = self._keys, self._masks, self._slot
        i = block & slot
        if keys[i] != block or not masks[i]:
            second = (block >> 32) & slot
            if keys[second] == block and masks[second]:
                i = second
            elif not masks[i]:
                keys[i] = block
            elif not masks[second]:
                i = second
                keys[i] = block
            else:
                # Both are taken: one of their hashes moves to its other slot
                # if that is free, else the first one's is forgotten.
                for j in (i, second):
                    if self._move(j):
                        i = j
                        break
                else:
                    masks[i] = 0
                    self._used -= 1
                keys[i] = block
        mask = masks[i]
        if not mask & bit:
            masks[i] = mask | bit
            self._used += not mask

    def _move(self, i: int) -> bool:
        """Moves the hash in slot `i` to its other slot if that one is free."""
        keys, masks, slot = self._keys, self._masks, self._slot
        block = keys[i]
        j = block & slot
        if j == i:
            j = (block >> 32) & slot
        if masks[j]:
            return False
        keys[j], masks[j], masks[i] = block, masks[i], 0
        return True

    def _grow(self) -> None:
        """Doubles the slots (until a quarter or less are taken, at most to
        `max_slots`) and puts each hash again."""
        slots = self.slots
        while self._used * 4 > slots and slots < self._max_slots:
            slots *= 2
        held = [(k, m) for k, m in zip(self._keys, self._masks, strict=True) if m]
        self._allocate(slots)
        put = self._put
        for block, mask in held:
            put(block, mask)

    def keep(self, bits: int) -> None:
        """Clears every bit but `bits` from every mask (in place: a copy of a
        full table would weigh some 20 MiB of Python ints while it lasts)."""
        masks, drop = self._masks, ~bits
        for i, mask in enumerate(masks):
            if mask & drop:
                masks[i] = mask & bits
        self._used = len(masks) - masks.count(0)

    def widen(self) -> None:
        """Lets masks hold more than 64 bits."""
        if not self._wide:
            self._wide = True
            self._masks = list(self._masks)

    def clear(self) -> None:
        """Forgets every hash (the slots stay allocated)."""
        self._allocate(self.slots)
