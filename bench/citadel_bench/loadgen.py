"""An async closed-loop load generator (aiohttp): N workers, each sending its next
request as soon as its last one is answered, bounded in count and in time."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class Sample:
    """One request: when it started, its latency and time to first chunk (s)."""

    start: float
    latency: float
    first_chunk: float
    ok: bool
    text: str = ""


@dataclass
class Run:
    """The samples of one run and its wall time."""

    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else math.nan


def parse_sse_text(payload: bytes) -> str:
    """The generated text in a server-sent-events body (chat or completion)."""
    parts: list[str] = []
    for event in payload.split(b"\n\n"):
        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            continue
        chunk = orjson.loads(event[6:])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else None
            piece = piece if piece is not None else choice.get("text")
            if isinstance(piece, str):
                parts.append(piece)
    return "".join(parts)


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    keep_text: bool = False,
) -> Sample:
    """One request; streams are read chunk by chunk to time the first one."""
    start = time.perf_counter()
    first = math.nan
    try:
        async with session.post(
            url, data=orjson.dumps(body), headers=headers or {}
        ) as response:
            buffer = bytearray()
            async for chunk in response.content.iter_any():
                if math.isnan(first):
                    first = time.perf_counter() - start
                if keep_text:
                    buffer += chunk
            ok = response.status == 200
    except (TimeoutError, aiohttp.ClientError):
        ok = False
        buffer = bytearray()
    latency = time.perf_counter() - start
    text = ""
    if keep_text and ok:
        if body.get("stream"):
            text = parse_sse_text(bytes(buffer))
        else:
            answer = orjson.loads(bytes(buffer))
            text = answer["choices"][0].get("message", {}).get("content", "")
    return Sample(start, latency, first, ok, text)


def session(concurrency: int, timeout_s: float = 60.0) -> aiohttp.ClientSession:
    """A client session with a connection per worker and JSON headers."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"content-type": "application/json"},
    )


async def closed_loop(
    url: str,
    body: Callable[[int], Mapping[str, Any]],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    headers: Mapping[str, str] | None = None,
) -> Run:
    """`concurrency` workers send `body(i)` until `max_requests` were sent or
    `max_seconds` passed."""
    run = Run()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    async with session(concurrency) as client:

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                run.samples.append(await send(client, url, body(i), headers))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - began
    return run
