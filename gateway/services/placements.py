"""Prefix-aware placements shared between gateway replicas through Redis pub/sub.

`PrefixAware` keeps, in each gateway process, which replica was sent which prompt
prefix. Behind a Service that spreads requests over several gateway replicas (the
chart runs two), a conversation's turns reach them in turn, and each sent the
conversation where it had sent it last: a closed-loop simulation of 16
conversations on 4 replicas moved 343 of every 1,000 turns with two gateways, 0
with one, each move a prefill of the whole conversation again.

Each gateway publishes, a few milliseconds after it routes a request, where it
sent which blocks (only the blocks new to that replica in its own table, and the
deepest one); every other gateway on the channel records them as if it had routed
the request itself. The next turn of the conversation, whichever gateway gets it,
then finds the replica that holds it. Only placements travel, never loads: each
gateway balances by its own requests in flight, as before.

Sharing is a hint: a request is routed and sent without waiting for Redis, and
another gateway's placements are learned on the event loop a slice at a time
(`LEARN_SLICE` records, then other work runs). Placements that cannot be
published (Redis down, the outbox full) are dropped and counted, and a gateway
cut off from the channel routes by what it knows itself, as a single gateway
does, until it subscribes again (after `RETRY_MAX_S` at most).

A message is one batch: a header (`MAGIC`, the sender's id, the number of
records), then per record a header (`_RECORD`: flags, block count, lengths of the
model name and the replica URL), the name and the URL in UTF-8 and the block
hashes as little-endian 64-bit integers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from citadel.gateway.kube.client import doubling_s
from citadel.gateway.services.prefix import Mark

log = logging.getLogger(__name__)

MAGIC = b"CPL1"
_HEADER = struct.Struct("<4s8sH")
_RECORD = struct.Struct("<BBHH")
_WINDOW = 1
"""Record flag: the last block closes a whole hashed window (`PrefixAware`);
the record's blocks are followed by the prompt's mark (`_MARK`)."""
_MARK = struct.Struct("<QQQ")
MAX_RECORDS = 128
"""Records per message at most (128 of 64 blocks each and long names are under
100 KB; most carry a block or two each)."""
LEARN_SLICE = 32
"""Records of a message learned before other work on the event loop runs: 32
of 64 blocks each take about 3 ms."""
RETRY_BASE_S = 0.5
"""The first pause before subscribing again after Redis failed; it doubles
with each failure in a row."""
RETRY_MAX_S = 5.0
"""The longest pause before subscribing again."""
STABLE_S = 10.0
"""A subscription that lasted this long before Redis failed ends a streak of
failures: the pauses start again from `RETRY_BASE_S`, with a warning."""
WARN_EVERY_S = 60.0
"""Malformed messages on the channel are logged at most once in this long."""
MAX_BLOCKS = 255
"""Blocks per record at most (the count is one byte; a prefix has 64)."""
LISTEN_S = 1.0
"""How long the subscription waits for a message before it looks again."""
MAX_NAME = 4096
"""Bytes of a model name or a replica URL at most."""


class PlacementFormatError(ValueError):
    """A message on the placements channel that is not one `encode` writes."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Blocks of a prompt prefix a gateway sent to a replica.

    Attributes:
        model: the model's served name.
        url: the replica's URL.
        blocks: block hashes (`prefix.block_hashes`) now held there.
        window: when the last of `blocks` closes a whole hashed window, where
            the prompt ends (`prefix.prompt_mark`); else None.
    """

    model: str
    url: str
    blocks: tuple[int, ...]
    window: Mark | None = None


def encode(sender: bytes, placements: Sequence[Placement]) -> bytes:
    """One message of `placements` from `sender` (8 bytes).

    Raises:
        ValueError: too many placements or blocks, or a name too long, for
            the format (the caller keeps within `MAX_*`).
    """
    return _message(sender, [_record(p) for p in placements])


def _message(sender: bytes, records: Sequence[bytes]) -> bytes:
    if len(records) > MAX_RECORDS:
        raise ValueError(f"{len(records)} placements, at most {MAX_RECORDS}")
    return _HEADER.pack(MAGIC, sender, len(records)) + b"".join(records)


def _record(p: Placement) -> bytes:
    """One placement as the message format writes it."""
    model, url = p.model.encode(), p.url.encode()
    if len(p.blocks) > MAX_BLOCKS or max(len(model), len(url)) > MAX_NAME:
        raise ValueError(f"placement of {p.model!r} too large to share")
    flags = _WINDOW if p.window is not None else 0
    parts = [
        _RECORD.pack(flags, len(p.blocks), len(model), len(url)),
        model,
        url,
        struct.pack(f"<{len(p.blocks)}Q", *p.blocks),
    ]
    if p.window is not None:
        parts.append(_MARK.pack(*p.window))
    return b"".join(parts)


def decode(message: bytes) -> tuple[bytes, list[Placement]]:
    """The sender and placements of a message `encode` wrote.

    Raises:
        PlacementFormatError: anything else (another version, cut short,
            trailing bytes, names not UTF-8, a record with no block).
    """
    try:
        magic, sender, count = _HEADER.unpack_from(message)
        if magic != MAGIC:
            raise PlacementFormatError(f"not a placements message: {magic!r}")
        at = _HEADER.size
        placements = []
        for _ in range(count):
            flags, blocks, model_size, url_size = _RECORD.unpack_from(message, at)
            at += _RECORD.size
            model = message[at : at + model_size].decode()
            at += model_size
            url = message[at : at + url_size].decode()
            at += url_size
            hashes = struct.unpack_from(f"<{blocks}Q", message, at)
            at += 8 * blocks
            window: Mark | None = None
            if flags & _WINDOW:
                window = _MARK.unpack_from(message, at)
                at += _MARK.size
            if not (blocks and model and url):
                raise PlacementFormatError("a placement with no block, model or URL")
            placements.append(Placement(model, url, hashes, window))
    except (struct.error, UnicodeDecodeError) as err:
        raise PlacementFormatError(f"malformed placements message: {err}") from err
    if at != len(message):
        raise PlacementFormatError(
            f"malformed placements message: {len(message) - at} bytes past its end"
        )
    return sender, placements


class PlacementCounts(Protocol):
    """What the exchange tells of its work (the gateway's metrics count it).

    Each method takes how many placements (or messages) it is about.
    """

    def published(self, count: int) -> None:
        """Placements sent to the channel."""

    def learned(self, count: int) -> None:
        """Placements of other gateways recorded."""

    def dropped(self, reason: str, count: int) -> None:
        """Placements not shared: `outbox` (more waiting than `max_pending`),
        `redis` (waiting when Redis failed), `unknown` (a model or replica this
        gateway does not route to), `malformed` (a message not `encode`'s)."""


class Uncounted:
    """`PlacementCounts` that keeps nothing."""

    def published(self, count: int) -> None:
        """Keeps nothing."""

    def learned(self, count: int) -> None:
        """Keeps nothing."""

    def dropped(self, reason: str, count: int) -> None:
        """Keeps nothing."""


class PlacementExchange:
    """Publishes this gateway's placements and records the other gateways'.

    A `Source`: `run` keeps the subscription and the publishing going until it
    is cancelled. When Redis fails, the placements waiting are dropped (and
    counted: their conversations are learned again at their next turns), one
    warning says so, and it subscribes again after a pause that doubles up to
    `RETRY_MAX_S`; a line says when sharing resumes.

    Args:
        client: a `redis.asyncio` client.
        channel: the channel every gateway of the release shares.
        learn: records another gateway's placement; says whether it was taken
            (False: a model or replica this gateway does not route to). The
            router's `learn`, set as the attribute `learn` once the router,
            which is told this exchange's `offer`, exists.
        counts: where the work is counted.
        flush_s: how long a placement waits for others to share its message.
        max_pending: placements waiting to be published at most (each is
            kept as the bytes it is sent as: 10,000 of 64 blocks are 6 MB).
        sender: this process's id on the channel (random by default).
        clock: monotonic seconds (for the rate of warnings).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        learn: Callable[[Placement], bool] = lambda placement: False,
        counts: PlacementCounts | None = None,
        flush_s: float = 0.005,
        max_pending: int = 10_000,
        sender: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._channel = channel
        self.learn = learn
        self._counts = counts or Uncounted()
        self._flush_s = flush_s
        self._outbox: deque[bytes] = deque()
        self._max_pending = max_pending
        self._waiting = asyncio.Event()
        self._sender = sender or os.urandom(8)
        self._clock = clock
        self._malformed_since_warning = 0
        self._warned_at = -math.inf
        self._failures = 0
        self._shared_once = False
        self._publish_failed = False

    def offer(self, placement: Placement) -> None:
        """Queues `placement` to be published (on the request's path: no I/O)."""
        try:
            record = _record(placement)
        except ValueError:
            self._counts.dropped("outbox", 1)
            return
        outbox = self._outbox
        if len(outbox) >= self._max_pending:
            outbox.popleft()
            self._counts.dropped("outbox", 1)
        outbox.append(record)
        self._waiting.set()

    async def run(self) -> None:
        """Subscribes and publishes until cancelled, subscribing again after
        Redis fails."""
        while True:
            started = self._clock()
            try:
                await self._session()
            except (RedisError, OSError) as err:
                if self._clock() - started >= STABLE_S:
                    # A subscription that lasted: this is a new outage (an
                    # idle gateway, which shares nothing, never said the
                    # last one ended).
                    self._failures = 0
                lost = len(self._outbox)
                self._outbox.clear()
                if lost:
                    self._counts.dropped("redis", lost)
                if not self._failures:
                    log.warning(
                        "placements not shared: Redis failed; subscribing again",
                        extra={"channel": self._channel, "error": repr(err)},
                    )
                self._failures += 1
                await asyncio.sleep(
                    doubling_s(self._failures, RETRY_BASE_S, RETRY_MAX_S)
                )

    def _shared(self, learned: bool = False) -> None:
        """A placement went through Redis (published, or another gateway's
        `learned`): after failures, the sharing works again, which a
        subscription alone does not show (a publish may still fail: an ACL,
        a replica of Redis read-only); but not by learning while this
        gateway's last publish failed (its peers may publish)."""
        if learned and self._publish_failed:
            return
        if self._failures or not self._shared_once:
            log.info(
                "sharing placements again"
                if self._shared_once
                else "sharing placements",
                extra={"channel": self._channel},
            )
        self._failures = 0
        self._shared_once = True

    async def _session(self) -> None:
        """Subscribes, then publishes and learns until Redis fails (raised as
        the first error of either, not a group)."""
        async with self._client.pubsub() as pubsub:
            await pubsub.subscribe(self._channel)
            log.debug("placements channel subscribed", extra={"channel": self._channel})
            publisher = asyncio.create_task(self._publish())
            try:
                while not publisher.done():
                    # A timeout, so that the client's health check pings an
                    # idle connection now and then: one cut without a word (a
                    # node gone) would otherwise be waited on for ever; and so
                    # that a publisher's failure is seen.
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_S
                    )
                    if message is not None and message["type"] == "message":
                        await self.receive(message["data"])
                    # get_message returns at once while messages are buffered:
                    # a backlog of them would hold the loop until it drains.
                    await asyncio.sleep(0)
                publisher.result()  # its error, if it ended by one
            finally:
                publisher.cancel()
                await asyncio.gather(publisher, return_exceptions=True)

    async def _publish(self) -> None:
        while True:
            await self._waiting.wait()
            # A moment for the requests arriving with this one to join it.
            await asyncio.sleep(self._flush_s)
            self._waiting.clear()
            while self._outbox:
                batch = self._take(MAX_RECORDS)
                try:
                    await self._client.publish(
                        self._channel, _message(self._sender, batch)
                    )
                except Exception:
                    self._counts.dropped("redis", len(batch))
                    self._publish_failed = True
                    raise
                self._publish_failed = False
                self._counts.published(len(batch))
                self._shared()

    def _take(self, limit: int) -> list[bytes]:
        outbox = self._outbox
        return [outbox.popleft() for _ in range(min(limit, len(outbox)))]

    async def receive(self, message: bytes) -> None:
        """Records the placements of another gateway's `message`, `LEARN_SLICE`
        at a time; skips this one's own (Redis sends a publisher its messages
        too)."""
        try:
            sender, placements = decode(message)
        except PlacementFormatError as err:
            self._counts.dropped("malformed", 1)
            self._warn_malformed(err)
            return
        if sender == self._sender:
            return
        taken = 0
        for start in range(0, len(placements), LEARN_SLICE):
            if start:
                await asyncio.sleep(0)
            taken += sum(self.learn(p) for p in placements[start : start + LEARN_SLICE])
        if taken:
            self._counts.learned(taken)
            self._shared(learned=True)
        if taken < len(placements):
            self._counts.dropped("unknown", len(placements) - taken)

    def _warn_malformed(self, error: PlacementFormatError) -> None:
        """Logs a malformed message, at most once in `WARN_EVERY_S` (someone
        else publishing on the channel would otherwise fill the log)."""
        self._malformed_since_warning += 1
        now = self._clock()
        if now - self._warned_at < WARN_EVERY_S:
            return
        log.warning(
            "placements messages dropped",
            extra={
                "channel": self._channel,
                "reason": str(error),
                "messages": self._malformed_since_warning,
            },
        )
        self._warned_at = now
        self._malformed_since_warning = 0


def channel_name(namespace: str) -> str:
    """The channel of the gateways that route by the routing document of
    `namespace` (several releases may share one Redis)."""
    return f"citadel:placements:{namespace}"
