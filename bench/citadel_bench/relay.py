"""A bare relay: Citadel's HTTP stack with none of Citadel's work per request.

A reference target for the routing benchmark (`python:bare-relay`), not a router
anyone should run. It serves on what the gateway serves on (uvicorn with httptools
and uvloop) and forwards with the gateway's own upstream client
(`citadel.gateway.upstream`), but reads nothing of the request: the body is
relayed as it came, the stream as it comes back, and there are no keys, limits,
prefix hashes, metrics, access log or token accounting. Each conversation (its
`x-session-id`) stays on the replica it first went to, the one with the fewest
requests in flight then, as vllm-router's `sticky_least_loaded` places them.

Beside the gateway and vllm-router on the same workload, it splits the gap between
the two at the client into what the stack costs (relay against vllm-router) and
what Citadel's request work costs (gateway against relay).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvicorn
from starlette.types import Receive, Scope, Send

from citadel.gateway.upstream import UpstreamClient, UpstreamSettings

SESSION_HEADER = b"x-session-id"


@dataclass
class StickyLeastLoaded:
    """Keeps each session on the replica it first went to: then the one with the
    fewest requests in flight, ties taken in turn.

    Args:
        backends: the replicas' base URLs.
    """

    backends: Sequence[str]
    in_flight: dict[str, int] = field(init=False)
    _homes: dict[bytes, str] = field(init=False, default_factory=dict)
    _turns: itertools.count[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.in_flight = dict.fromkeys(self.backends, 0)

    def choose(self, session: bytes) -> str:
        """The replica for a request of `session` (b"" for none: never sticky)."""
        home = self._homes.get(session) if session else None
        if home is not None:
            return home
        n = len(self.backends)
        start = next(self._turns) % n
        ordered = [self.backends[(start + i) % n] for i in range(n)]
        chosen = min(ordered, key=self.in_flight.__getitem__)
        if session:
            self._homes[session] = chosen
        return chosen


class BareRelay:
    """The ASGI app: POSTs are relayed to a replica; anything else gets 200.

    Args:
        placement: where each request goes.
        upstream: the gateway's upstream client.
    """

    def __init__(self, placement: StickyLeastLoaded, upstream: UpstreamClient) -> None:
        self._placement = placement
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await self._upstream.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":  # the readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        session = dict(scope["headers"]).get(SESSION_HEADER, b"")
        url = self._placement.choose(session)
        in_flight = self._placement.in_flight
        in_flight[url] += 1
        try:
            reply = await self._upstream.post(
                url + scope["path"],
                b"".join(chunks),
                {"content-type": "application/json"},
            )
            headers = [(b"content-type", reply.content_type.encode("latin-1"))]
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": headers,
                }
            )
            async for chunk in reply.chunks():
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            in_flight[url] -= 1


def main(argv: list[str] | None = None) -> None:
    """Serves the relay until stopped."""
    parser = argparse.ArgumentParser(prog="python -m citadel_bench.relay")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("backends", nargs="+", help="the replicas' base URLs")
    args = parser.parse_args(argv)
    app = BareRelay(
        StickyLeastLoaded(args.backends), UpstreamClient(UpstreamSettings())
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
    )


if __name__ == "__main__":
    main()
