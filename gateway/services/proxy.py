"""The request path below any protocol: check, limit, route, forward, account.

REST calls `ProxyService.handle`; other front doors (gRPC, GraphQL) call the same
method, so keys, limits, routing, metrics and errors are the same whichever door a
request comes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

import xxhash

from citadel.gateway.errors import (
    BackendError,
    BackendTimeout,
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelOverloaded,
    NoReplica,
    RateLimited,
    ShuttingDown,
    refusal,
    refusal_body,
    refusal_json,
    retry_after_seconds,
)
from citadel.gateway.metrics import (
    FALLBACK_BUSY,
    FALLBACK_NO_REPLICA,
    FALLBACK_WAKING,
    STATE_IN_FLIGHT,
    STATE_QUEUED,
    STATE_WAITING,
    UNKNOWN_MODEL,
    GatewayMetrics,
    ModelIdentity,
)
from citadel.gateway.routes import SPLIT_WEIGHT_TOTAL, ModelRoute
from citadel.gateway.services.auth import Principal, Priority
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.limits import Admission, Limiter, estimate_tokens
from citadel.gateway.services.queueing import ReplicaQueue
from citadel.gateway.services.replicas import EjectionPolicy, Replica
from citadel.gateway.services.requests import (
    ApiCall,
    Door,
    ParsedBody,
    client_wants_usage,
    parse_body,
    prompt_body,
    session_id,
)
from citadel.gateway.services.routing import NO_REPLICA_RETRY_S, Router
from citadel.gateway.services.shedding import (
    PRIORITY_HEADER,
    LoadShedder,
    SheddingSettings,
    priority_of,
)
from citadel.gateway.services.sse import EventFilter, Usage, error_event, usage_of_body
from citadel.gateway.services.strategies import RouteRequest
from citadel.gateway.services.streams import Closing
from citadel.gateway.upstream import (
    Reply,
    Upstream,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamDropped,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnreachable,
)

log = logging.getLogger("citadel.gateway.access")

Reader = Callable[[bytes], None]
"""A door's reading of a whole answer (`ProxyService.handle`'s `read`)."""

T = TypeVar("T")
_UNWORKED = frozenset({429, 503})
"""A replica's statuses that say it took the request on no work (its queue is
full, or it is not serving): another replica is tried."""
_DROPS_RETRIED = 1
"""Replicas tried again after one dropped the request (or broke off a whole
answer, or a stream before its first event): a request that crashes vLLM
would otherwise take down every replica it is retried on, up to `retries` + 1
of them; one more try still saves a request whose replica died under it for
another reason."""
_RECHECK_S = 1.0
"""How often a request held for a model at zero looks for a replica besides
each change the catalog reports (`ProxyService._await_replica`): a change
missed for any reason costs it a second at most."""
WAKE_SIGNAL_S = 5.0
"""How long a request for a model at zero that went to a fallback at once
counts as waiting for the model (`citadel_gateway_model_requests`), whatever
becomes of it: it is not held, yet the operator's autoscaler must see the
demand to start a replica, and it reads the count every 2 s, so this spans two
of its reads whatever their phase."""
FALLBACK_HEADER = "x-citadel-fallback"
"""The response header that names the fallback that answered, as the
requested model's route lists it."""
SPLIT_HEADER = "x-citadel-split"
"""The response header that names the model the requested model's split sent
the request to, as the split lists it."""
_HASH_SPAN = float(1 << 53)
"""The points a session's hash is cut to (`_session_point`): a float holds 53
bits exactly, so each point is below 1 (64 bits divided by 2**64 may round to
1.0, past every split)."""


def _read_already(error: GatewayError) -> None:
    """`ProxyResponse.unusable` of a whole answer, which its door read (`read`)
    before it was counted."""


@dataclass
class ProxyResponse:
    """What goes back to the client: a whole body or a stream of SSE bytes."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: Closing[bytes] | None = None
    """Close it when done, read or not: it holds a replica until then."""
    media_type: str = "application/json"
    unusable: Callable[[GatewayError], None] = _read_already
    """For a stream: its door, before closing it, says why it cannot use what
    the replica sent (a chunk that is not JSON, or does not fit the door's
    message); the request is then counted as that error, which is what the
    door's client gets, not as the 200 the replica sent. REST relays the bytes
    and never calls it."""
    error_event: Callable[[dict[str, Any]], bytes] = error_event
    """For a stream: how an error is written into it after it began (an
    OpenAI error body in, SSE bytes out), in the stream's own kind of event."""


def _fallback_reason(error: NoReplica | RateLimited) -> str:
    """Why a request leaves a model whose `_send` raised `error` for a
    fallback (`GatewayMetrics.fallbacks`' reason)."""
    return FALLBACK_BUSY if isinstance(error, RateLimited) else FALLBACK_NO_REPLICA


def _priority(principal: Principal, asked: Sequence[str]) -> Priority:
    """The request's priority (`shedding.priority_of`): the key's, or the
    lower one its headers ask for.

    Raises:
        InvalidRequest: a header names no priority.
    """
    priority = priority_of(principal.priority, asked)
    if priority is None:
        names = " or ".join(f"`{p.value}`" for p in Priority)
        raise InvalidRequest(f"The header `{PRIORITY_HEADER}` must be {names}.")
    return priority


def _session_point(model: str, session: str) -> float:
    """Where a conversation falls in the split of `model` (its served name):
    a point in [0, 1) from a hash of both. The model's name keeps a
    conversation's place in one model's split apart from its place in
    another's, so that the same conversations are not the canaries' of every
    model."""
    digest = xxhash.xxh3_64_intdigest(f"{model}\x1f{session}".encode())
    return (digest >> 11) / _HASH_SPAN


def _sent_elsewhere(ctx: _Context) -> dict[str, str]:
    """The headers that name where the request went instead of the model asked
    for: its split's target (`SPLIT_HEADER`), the fallback that answered or
    failed it (`FALLBACK_HEADER`); none for a request that stayed."""
    named = {}
    if ctx.split is not None:
        named[SPLIT_HEADER] = ctx.split
    if ctx.fallback is not None:
        named[FALLBACK_HEADER] = ctx.fallback
    return named


def _identity(ctx: _Context) -> ModelIdentity:
    """The model a request that holds a replica is counted under (its route
    is set before any replica is chosen)."""
    route = ctx.route
    assert route is not None
    return route.namespace, route.name


def _error_event_of(
    ctx: _Context, events: EventFilter
) -> Callable[[dict[str, Any]], bytes]:
    """How the gateway writes an error into this stream: typed and numbered
    after the replica's last event where its events are (`ApiCall.typed_events`,
    a Responses stream), else as a chat's error chunk."""
    if not ctx.call.typed_events:
        return error_event
    return lambda body: error_event(body, events.next_sequence())


@dataclass
class _Context:
    """One request's facts, gathered as it goes (for metrics and the log)."""

    call: ApiCall
    principal: Principal
    request_id: str
    started: float
    session: str | None = None
    """The conversation's id from the session header, if sent (`session_id`:
    as sent, or its hash)."""
    door: Door = Door.REST
    model: str = UNKNOWN_MODEL
    route: ModelRoute | None = None
    replica: Replica | None = None
    admission: Admission | None = None
    holding: bool = False
    """True while `replica` counts this request as in flight."""
    ejections: int = 0
    """`replica`'s ejections when the request took it: its result judges the
    replica only if none came since (`Replica.record_success`)."""
    reached: bool = False
    """True once a replica may have worked on it (anything but a connection
    that failed before the request got to the replica)."""
    dropped: bool = False
    """True once a replica closed the connection without answering after the
    request was written (`UpstreamDropped`), or broke off a whole answer or a
    stream before its first event: it may have worked on it."""
    worked: bool = False
    """True once a replica may have worked on it without answering it whole:
    it dropped it, broke off its answer, or did not answer in time after the
    request was written
    (`UpstreamTimeout`, waiting for the headers, for the rest of the body, or
    for a stream's first event).
    Its estimate then stays charged, though no usage came back."""
    finished: bool = False
    """True once the request is counted and logged."""
    settled: Mapping[str, float] = field(default_factory=dict)
    """What settling its tokens took from each bucket (`Limiter.settle`)."""
    unusable: GatewayError | None = None
    """Why its door could not use the streamed answer, if it could not."""
    fallback: str | None = None
    """The fallback tried, as the requested model's route lists it, once the
    request left that model for it (`route` and `model` are then its)."""
    fallback_from: str | None = None
    """The requested model's upstream name while a fallback is tried."""
    split: str | None = None
    """The model the requested model's split sent the request to, as the
    split lists it (`route` and `model` are then its, from before admission
    on)."""
    split_from: str | None = None
    """The requested model's upstream name (its served name) once its split
    sent the request to another model."""
    priority: Priority = Priority.STANDARD
    """What it is served at: the key's priority, or the lower one it asked
    for (`shedding.priority_of`). The key's until its headers are read, so a
    sheddable key's request refused before (a 404, a 400) is logged as
    sheddable too."""

    def __post_init__(self) -> None:
        self.priority = self.principal.priority

    @property
    def replica_model(self) -> str:
        """The model label of what is counted per replica (in flight, failures,
        ejections): the base model's served name, an adapter's request's too,
        as the replica and its health are the base's."""
        return self.route.served_name if self.route else self.model

    def found_unusable(self, error: GatewayError) -> None:
        """Notes why the door could not use the stream (before it closes it)."""
        self.unusable = error


@dataclass
class _Begun:
    """A stream's reply read up to its first output (`ProxyService._begin`),
    which its door relays from."""

    reply: Reply
    events: EventFilter
    """What cut the first output; it cuts the rest, its state carried over."""
    chunks: AsyncIterator[bytes]
    """The reply's body, past what `first` was cut from."""
    first: bytes
    """The first output to relay: empty only for a stream that ended with
    nothing to relay."""
    error_event: Callable[[dict[str, Any]], bytes]
    """How an error is written into this stream (`_error_event_of`)."""


@dataclass
class _Refusals:
    """What the replicas that refused a request unworked (`_UNWORKED`) said."""

    statuses: set[int] = field(default_factory=set)
    count: int = 0
    """Replicas that refused."""
    wait_s: int | None = None
    """The shortest `Retry-After` one of them gave, in seconds."""
    body: bytes = b""
    """The last one's body (for its message)."""

    def add(self, reply: Reply, body: bytes) -> None:
        """Notes one replica's refusal."""
        self.statuses.add(reply.status)
        self.count += 1
        wait = retry_after_seconds(reply.retry_after)
        if wait is not None:
            self.wait_s = wait if self.wait_s is None else min(self.wait_s, wait)
        self.body = body

    def error(self, model: str, tries: int) -> GatewayError:
        """The answer once no replica is left to try, after `tries` tries
        (none dropped): a 429, with the replica's message, when every one said
        429, else a 503 (one not serving, or not reachable, is more than a
        model at capacity); either tells the client to come back when the
        first replica said it could."""
        wait = NO_REPLICA_RETRY_S if self.wait_s is None else self.wait_s
        if self.statuses == {429} and self.count == tries:
            seconds = str(math.ceil(wait))  # as a replica's header says it
            return refusal(429, refusal_body(429, self.body), seconds)
        return NoReplica(
            f"Every replica of `{model}` tried is busy or not serving; "
            "try again shortly.",
            retry_after_s=wait,
        )


@dataclass(slots=True)
class _Outbound:
    """What a request sends to whichever model answers it: the model asked
    for, or its fallbacks (`ProxyService._send_or_fall_back`), which may send
    it to several (slots, not frozen: made for every request, in 0.17 us
    where a frozen one took 0.74, timeit)."""

    parsed: ParsedBody
    prompt: Mapping[str, Any]
    """What reads the prompt (`prompt_body`)."""
    estimate: int
    """Its tokens as admitted, the same for each model."""
    headers: dict[str, str]
    stream: bool
    keep_usage: bool


@dataclass(frozen=True)
class ProxyOptions:
    """How hard the proxy tries, and its token estimate."""

    retries: int = 2
    default_max_tokens: int = 256
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    answer_within_s: float = 600.0
    """The most a request's tries may take together, from the first, until
    its answer begins (a stream's first event, or a whole answer's body): a try
    gets what is left of it, and none starts with less than `least_try_s`
    left. Without it each of `retries` + 1 tries could wait the whole read
    timeout. Wired as the
    upstream's read timeout: a later try, given less, timed out on the
    request's deadline, not on the replica's slowness."""
    least_try_s: float = 2.0
    """No try after the first starts with less than this left of
    `answer_within_s`. Wired as the upstream's connect timeout, so that every
    try may connect for as long as the first. A try with less left would
    seldom see an answer begin anyway, and would load a replica (its prefill
    runs on once the gateway stops waiting) for an answer the client never
    gets. It must be well below `answer_within_s`: the first try's failure,
    however quick, takes some of that, so a floor at or above it lets no retry
    start (wired at most half of it). Below `connect_within_s` (so wired with a
    read timeout under twice the connect timeout) a retry's connection may be
    cut short by the request's deadline: a connect timeout is then the
    deadline's, and judges no replica.

    It also says how much of `answer_within_s` a retry may lack and still be
    judged by its timeout as the first try is (the tries before it took less
    than a connection may), and half of it bounds the read of an error's body
    (`ProxyService._body`)."""
    connect_within_s: float = 2.0
    """The upstream's connect timeout: a retry given less than this whose
    connection timed out was cut short by the request's deadline, not by its
    replica."""
    scale_from_zero_within_s: float = 300.0
    """How long a request for a model that scales from zero
    (`ModelRoute.scale_from_zero`) waits for a ready replica before its 503;
    0 waits not at all. Its tries' `answer_within_s` starts once one is
    found."""
    shedding: SheddingSettings = field(default_factory=SheddingSettings)
    """When a replica counts as full, for shedding sheddable requests."""
    queue_within_s: float = 60.0
    """How long a request for a model with `maxRequestsPerReplica` waits at
    the gateway for a replica with room before its 503 `model_overloaded`; 0
    waits not at all. Its tries' `answer_within_s` starts once one is found; a
    retry waits as long at most, within that time."""


class ProxyService:
    """Forwards OpenAI requests to a model's replicas.

    Args:
        draw: where a request without a session falls in a model's split
            (`ModelRoute.split`): a number in [0, 1), uniformly at random.
    """

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        limiter: Limiter,
        upstream: Upstream,
        metrics: GatewayMetrics,
        options: ProxyOptions,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._limiter = limiter
        self._upstream = upstream
        self._metrics = metrics
        self._options = options
        self._clock = clock
        self._draw = draw
        self._shedder = LoadShedder(catalog, options.shedding, clock)
        self._queue: ReplicaQueue[Replica] = ReplicaQueue()
        # Settles running on after the request that started them was cancelled
        # (a task nothing references may be collected before it finishes).
        self._unfinished: set[asyncio.Task[Any]] = set()
        self._cut_at = math.inf
        self._stopping = False
        # Set, and dropped, at each change of the catalog or the start of a
        # shutdown: what requests held for a model at zero wait on. None
        # while none waits, so that a change costs nothing then.
        self._wake: asyncio.Event | None = None
        catalog.on_change(self._wake_waiters)
        # A replica added, or a bound raised, is room for requests queued.
        catalog.on_change(self._queue.offer_all)
        metrics.model_requests.follow(
            lambda: (
                ((r.namespace, r.name), r.max_requests_per_replica is not None)
                for r in catalog.routes()
            )
        )

    def stopping(self, grace_s: float) -> None:
        """The server stops: what still runs after `grace_s` is cut by it, not
        by its client, and is counted so (503 `shutting_down`). Requests held
        for a model at zero, or queued for a replica with room, end now (503
        `shutting_down`): one may wait minutes, past the grace, and another
        gateway replica can hold it."""
        self._cut_at = self._clock() + grace_s
        self._stopping = True
        self._wake_waiters()
        self._queue.close(self._stopping_error)

    @staticmethod
    def _stopping_error() -> ShuttingDown:
        return ShuttingDown(
            "The gateway is stopping and every replica of the model is busy; "
            "try again.",
            retry_after_s=1,
        )

    def _wake_waiters(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    @property
    def cut(self) -> bool:
        """True once the shutdown grace has run out."""
        return self._clock() >= self._cut_at

    def shedding_watched(self) -> set[tuple[str, str]]:
        """The models whose replicas' `/metrics` shedding needs read
        (`LoadShedder.watched`), for the scraper."""
        return self._shedder.watched()

    @property
    def limiter(self) -> Limiter:
        """The limits it enforces (read by the GraphQL `usage` query)."""
        return self._limiter

    async def handle(
        self,
        call: ApiCall,
        principal: Principal,
        raw: bytes,
        request_id: str,
        session: str | None = None,
        door: Door = Door.REST,
        read: Reader | None = None,
        priority: Sequence[str] = (),
    ) -> ProxyResponse:
        """Answers one request.

        Args:
            session: the session header as sent, if it was; routed by and
                logged as `session_id` makes it (every door's goes through
                here).
            read: a door's reading of a whole answer with status 200, run
                before the request is counted: a `GatewayError` it raises (an
                answer the door cannot use) is what the request ends with and
                is counted as. A stream's door says so through
                `ProxyResponse.unusable`.
            priority: every value of the priority header
                (`x-citadel-priority`) as sent: a lower priority than the
                key's, or a 400.

        Raises:
            GatewayError: any refusal or failure, to be shown in OpenAI's shape.
        """
        ctx = _Context(
            call, principal, request_id, self._clock(), session_id(session), door
        )
        try:
            return await self._handle(ctx, raw, read, priority)
        except GatewayError as err:
            # Raised by a model the request went to instead of the one asked
            # for (its limits, its failure): its client learns whose it is,
            # as from an answer.
            err.headers.update(_sent_elsewhere(ctx))
            await self._fail(ctx, err)
            raise
        except asyncio.CancelledError:
            # The caller went away (a gRPC cancel or deadline). The upstream
            # request is dropped with the task; the estimate stays charged, as
            # the replica may have worked on it.
            self._abandon(ctx)
            raise
        except Exception as err:
            # A bug: free the replica and count the request all the same, or a
            # load-aware strategy would see the replica busy for ever.
            log.error("unexpected error", exc_info=err, extra=self._log_fields(ctx))
            self._let_go(ctx)
            failure = InternalError("The gateway failed unexpectedly.")
            failure.headers.update(_sent_elsewhere(ctx))
            await self._account(ctx, None, failure.status, failure.code)
            raise failure from err

    async def _handle(
        self, ctx: _Context, raw: bytes, read: Reader | None, asked: Sequence[str]
    ) -> ProxyResponse:
        parsed = parse_body(raw, ctx.call)
        body = parsed.body
        name = body["model"]
        ctx.route = route = self._catalog.resolve(name)
        # What the replicas are sent and what the request is counted under:
        # the served name for any of the base's names, an adapter's own name
        # (a model of its own, billed as such, on the base's replicas).
        upstream_model = route.upstream_name(name)
        ctx.model = upstream_model
        # The model asked for refuses the key for good: a split is no way
        # around its permissions.
        ctx.principal.check(route, name)
        ctx.priority = _priority(ctx.principal, asked)
        if route.split:
            split = self._split(ctx, route, name)
            if split is not None:
                # The request is the target's from here on, as if asked for
                # by its name: its limits, its fallbacks, its metrics.
                name, route = split
                ctx.split, ctx.split_from, ctx.route = name, upstream_model, route
                upstream_model = ctx.model = route.upstream_name(name)
                self._metrics.splits.labels(ctx.split_from, name).inc()
        if ctx.priority is Priority.SHEDDABLE and self._shedder.saturated(route):
            # Before admission: a request shed costs its key nothing.
            key = self._metrics.key_label(ctx.principal.name)
            self._metrics.shed.labels(ctx.model, key).inc()
            raise ModelOverloaded(
                f"The model `{ctx.model}` is overloaded: every replica is full, "
                "so requests of priority sheddable are refused until one has "
                "room. Retry later.",
                retry_after_s=self._options.shedding.scrape_period_s,
            )
        stream = parsed.stream
        # What reads the prompt reads a Responses request as its chat: made
        # once for the estimate and the routing (4.7 us for 20 items, timeit).
        prompt = prompt_body(body, ctx.call)
        estimate = estimate_tokens(
            body, ctx.call, self._options.default_max_tokens, prompt
        )
        ctx.admission = await self._admit(ctx, route, estimate)
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        # The usage chunk is dropped only where the gateway asked for it.
        keep = stream and (not ctx.call.usage_option or client_wants_usage(body))
        outbound = _Outbound(parsed, prompt, estimate, headers, stream, keep)
        if route.fallbacks:
            response, data = await self._send_or_fall_back(ctx, route, name, outbound)
        else:
            # Only once admitted: a refused request never wakes a model.
            route = await self._await_replica(ctx, route, name)
            response, data = await self._send_as(ctx, route, upstream_model, outbound)
        admission = ctx.admission
        assert admission is not None  # the answering model's, taken above
        reply_headers = {
            **admission.headers,
            "x-request-id": ctx.request_id,
            **_sent_elsewhere(ctx),
        }
        if isinstance(data, _Begun):
            return ProxyResponse(
                200,
                {**reply_headers, "cache-control": "no-cache"},
                stream=self._relay(ctx, data),
                media_type="text/event-stream",
                error_event=data.error_event,
                unusable=ctx.found_unusable,
            )
        return await self._whole(ctx, response, data, reply_headers, read)

    def _split(
        self, ctx: _Context, route: ModelRoute, requested: str
    ) -> tuple[str, ModelRoute] | None:
        """The target of `route`'s split that takes the request for its name
        `requested`, as the split lists it, and its route; None where `route`
        keeps the request.

        A request for one of the model's own names (`ModelRoute.names`, not
        an adapter's: an adapter is a model of its own) falls at a point in
        [0, 1): one its session's hash gives (`_session_point`), so that a
        conversation stays on one model while the weights stay, else one drawn
        at random. The targets take the points below their weights added up
        in order (10 and 20: below 0.1 the first, below 0.3 the second); the
        model keeps the rest. A target is skipped, and the model keeps the
        request as if it had no split, when no model has its name, it is the
        model itself, the key may not use it, or it has no ready replica (a
        model still starting, or at zero, takes no share, and no request is
        held for it).
        """
        if requested not in route.names:
            return None
        session = ctx.session
        point = (
            self._draw()
            if session is None
            else _session_point(route.served_name, session)
        )
        total = 0
        for target in route.split:
            total += target.weight
            if point < total / SPLIT_WEIGHT_TOTAL:
                break
        else:
            return None
        name = target.model
        chosen, why = self._other_model(ctx, route, name)
        if chosen is not None:
            if self._catalog.has_ready(chosen):
                return name, chosen
            why = "no ready replica"
        extra = {"request_id": ctx.request_id, "split": name, "why": why}
        log.debug("split target skipped", extra=extra)
        return None

    def _other_model(
        self, ctx: _Context, route: ModelRoute, name: str
    ) -> tuple[ModelRoute | None, str]:
        """The route of the model `name` that `route`'s fallbacks or split
        list, if the request may go there, else None and why not: no model by
        that name, the requested model itself, or one the key may not use."""
        other = self._catalog.route_named(name)
        if other is None:
            return None, "no model by that name"
        if (other.namespace, other.name) == (route.namespace, route.name):
            return None, "the requested model itself"
        if not ctx.principal.may_use(other, name):
            return None, "the key may not use it"
        return other, ""

    async def _admit(
        self, ctx: _Context, route: ModelRoute, estimate: int
    ) -> Admission:
        """The key's admission to `route` for the request (`ctx.model`), a
        refusal counted as rate limited."""
        try:
            return await self._limiter.admit(ctx.principal, route, estimate)
        except GatewayError as err:
            key = self._metrics.key_label(ctx.principal.name)
            scope = getattr(err, "scope", "") or "requests"
            self._metrics.rate_limited.labels(ctx.model, key, scope).inc()
            raise

    async def _send_or_fall_back(
        self, ctx: _Context, route: ModelRoute, requested: str, outbound: _Outbound
    ) -> tuple[Reply, bytes | _Begun]:
        """The answer of the requested model (`route`, admitted, asked for by
        `requested`: the request's name, or its split's target as listed), else
        of the first of its fallbacks that gives one (`_fallback` says which
        are skipped), tried in their order.

        The request turns to the next fallback only where the model before
        could not answer it and did no work on it: `_send` found no replica
        (`NoReplica`: none ready, none reachable, or each refused it unworked
        with a 503), or every replica answered 429 (`_Refusals.error`); or
        the requested model scales from zero and has no ready replica, whose
        demand is then signalled (`_signal_waking`) instead of the request
        being held; it is held for that model after all, as it would be
        without fallbacks, when none of them answers (a fallback makes the
        answer come sooner, never later or worse). Any other failure is the
        answer, as without fallbacks:
        one after a replica may have worked on the request (a drop, a
        timeout) would have it worked twice. A fallback's own fallbacks are
        never followed (no chains, no loops).

        Each model's admission is given back in full before the request
        leaves it; the one that answers keeps its own, and the request is
        counted under it (`_Context.fallback` says which it was).

        Raises:
            GatewayError: the requested model's own error when no fallback
                could answer (counted under it, with its `x-ratelimit-*`
                headers), or the failure of the fallback that was sent it.
        """
        model = ctx.model
        error: GatewayError
        waking: Callable[[], None] | None = None
        if route.scale_from_zero and not self._catalog.has_ready(route):
            waking = self._signal_waking(route)
            reason = FALLBACK_WAKING
            error = NoReplica(
                f"The model `{route.served_name}` is starting from zero; "
                "try again shortly.",
                retry_after_s=NO_REPLICA_RETRY_S,
            )
        else:
            # `_send` raises neither once a replica may have worked on the
            # request (a drop, a timeout: BackendError, BackendTimeout).
            try:
                return await self._send_as(ctx, route, model, outbound)
            except (NoReplica, RateLimited) as err:
                reason, error = _fallback_reason(err), err
        admission, replica = ctx.admission, ctx.replica
        settled = await self._give_back(ctx)
        for name in route.fallbacks:
            fallback = await self._fallback(ctx, route, name, outbound.estimate)
            if fallback is None:
                continue
            ctx.route, ctx.admission = fallback
            ctx.model = ctx.route.upstream_name(name)
            ctx.fallback, ctx.fallback_from = name, model
            # Whether a replica of this model may have worked on it: that of
            # the model before judged what it gave back, and is done with.
            ctx.reached = False
            self._metrics.fallbacks.labels(model, name, reason).inc()
            # Any other failure of the fallback is the answer (`handle` names
            # the fallback on it, as on an answer).
            try:
                return await self._send_as(ctx, ctx.route, ctx.model, outbound)
            except (NoReplica, RateLimited) as err:
                reason = _fallback_reason(err)
                await self._give_back(ctx)
        # None could answer: the request is the requested model's again.
        ctx.route, ctx.model, ctx.replica = route, model, replica
        ctx.fallback = ctx.fallback_from = None
        if waking is not None and self._options.scale_from_zero_within_s > 0:
            # Held for it, as without fallbacks: its admission taken again (a
            # refusal leaves the wake signal running: the model is still
            # wanted), no replica of it reached yet (a fallback's that said 429
            # must not keep the request charged if the hold times out), and
            # counted as waiting by the hold alone (the signal would count it
            # twice: a second replica).
            ctx.admission = await self._admit(ctx, route, outbound.estimate)
            ctx.reached = False
            waking()
            held = await self._await_replica(ctx, route, requested)
            return await self._send_as(ctx, held, model, outbound)
        # The client learns why the model it asked for could not, and the
        # request counts under that model.
        if admission is not None:
            error.headers = {**admission.headers_after(settled), **error.headers}
        raise error

    async def _fallback(
        self, ctx: _Context, route: ModelRoute, name: str, estimate: int
    ) -> tuple[ModelRoute, Admission] | None:
        """The route of the fallback `name` of `route`, and its admission for
        the request; None when it is skipped: no model by that name, the
        requested model itself, one the key may not use, one whose own limits
        refuse the key (nothing taken then), or one that scales from zero and
        has no ready replica (a fallback is never held for)."""
        fallback, why = self._other_model(ctx, route, name)
        if fallback is not None:
            if fallback.scale_from_zero and not self._catalog.has_ready(fallback):
                why = "starting from zero"
            else:
                try:
                    admission = await self._limiter.admit(
                        ctx.principal, fallback, estimate
                    )
                except GatewayError as err:
                    why = f"its limits refuse the key ({err.code})"
                else:
                    return fallback, admission
        extra = {"request_id": ctx.request_id, "fallback": name, "why": why}
        log.debug("fallback skipped", extra=extra)
        return None

    async def _send_as(
        self,
        ctx: _Context,
        route: ModelRoute,
        upstream_model: str,
        outbound: _Outbound,
    ) -> tuple[Reply, bytes | _Begun]:
        """`_send` of the request to `route`'s replicas, named `upstream_model`
        in its body, routed by `route`'s own strategy."""
        out = outbound.parsed.upstream(upstream_model)
        # An adapter's prefixes are its own (vLLM's cache keeps them apart).
        adapter = upstream_model if upstream_model != route.served_name else None
        request = RouteRequest(outbound.prompt, ctx.session, adapter)
        return await self._send(
            ctx,
            route,
            out,
            outbound.headers,
            request,
            outbound.stream,
            outbound.keep_usage,
        )

    async def _give_back(self, ctx: _Context) -> Mapping[str, float]:
        """Gives back the admission of the model the request leaves for a
        fallback, in full (its request and tokens): that model did no work on
        it, and the model that answers charges its own.

        Returns:
            What was given back to each bucket (`Limiter.settle`).
        """
        admission, ctx.admission = ctx.admission, None
        if admission is None:
            return {}
        # Spared by a client that leaves meanwhile, as `_account`'s settle: the
        # model did no work, and a refund cut short (Redis) would keep it
        # charged.
        return await self._shielded(self._given_back(ctx, admission))

    async def _given_back(
        self, ctx: _Context, admission: Admission
    ) -> Mapping[str, float]:
        try:
            return await self._limiter.settle(admission, 0, served=False)
        except Exception:  # a limit store hiccup must not fail the request
            log.exception(
                "could not give back an admission", extra=self._log_fields(ctx)
            )
            return {}

    def _signal_waking(self, route: ModelRoute) -> Callable[[], None]:
        """Counts a request for `route`'s model at zero as waiting for
        `WAKE_SIGNAL_S`, though it is not held (it went to a fallback): what
        the operator's autoscaler reads to start a replica.

        Returns:
            What ends the count at once (the timer's end is then a no-op).
        """
        model: ModelIdentity = (route.namespace, route.name)
        demand = self._metrics.model_requests
        demand.add(model, STATE_WAITING, 1)
        counting = True

        def end() -> None:
            nonlocal counting
            if counting:
                counting = False
                demand.add(model, STATE_WAITING, -1)

        asyncio.get_running_loop().call_later(WAKE_SIGNAL_S, end)
        return end

    async def _await_replica(
        self, ctx: _Context, route: ModelRoute, name: str
    ) -> ModelRoute:
        """`route`, as it stands once its model has a replica to try.

        A request for a model that scales from zero (`ModelRoute.
        scale_from_zero`) with no replica is held, counted as waiting (what the
        operator's autoscaler reads to start one), until the catalog has one,
        for up to `ProxyOptions.scale_from_zero_within_s`. It looks again at
        each change of the catalog, and every `_RECHECK_S`, under the route in
        force for `name` then: a route that no longer scales from zero, or
        that went, is returned as it is, and the router answers it as any
        model without a replica (503 at once). Any other request goes on at
        once. A client that leaves cancels the wait.

        Raises:
            NoReplica: no replica within the time.
            ShuttingDown: the gateway began to stop meanwhile.
        """
        within = self._options.scale_from_zero_within_s
        # Held unless a replica is ready and staying: a model scaling to zero
        # keeps its last pod in its endpoints, terminating and "serving", for
        # the seconds its readiness probe takes to fail, and vLLM refuses new
        # connections from its SIGTERM on, so a request sent there got a 503
        # and was never counted as waiting: nothing woke the model.
        if not route.scale_from_zero or within <= 0 or self._catalog.has_ready(route):
            return route
        model: ModelIdentity = (route.namespace, route.name)
        demand = self._metrics.model_requests
        loop = asyncio.get_running_loop()
        ends = loop.time() + within
        demand.add(model, STATE_WAITING, 1)
        try:
            while not self._stopping and (left := ends - loop.time()) > 0:
                if self._wake is None:
                    self._wake = asyncio.Event()
                wake = self._wake
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, _RECHECK_S)):
                        await wake.wait()
                current = self._catalog.route_named(name)
                if current is None or (current.namespace, current.name) != model:
                    return route
                ctx.route = route = current
                if not route.scale_from_zero or self._catalog.has_ready(route):
                    return route
        finally:
            demand.add(model, STATE_WAITING, -1)
        if self._stopping:
            raise ShuttingDown(
                f"The model `{route.served_name}` is starting from zero and the "
                "gateway is stopping; try again.",
                retry_after_s=1,
            )
        raise NoReplica(
            f"The model `{route.served_name}` is starting from zero and had no "
            f"ready replica within {within:g} s; try again shortly.",
            retry_after_s=NO_REPLICA_RETRY_S,
        )

    async def _send(
        self,
        ctx: _Context,
        route: ModelRoute,
        body: bytes,
        headers: dict[str, str],
        request: RouteRequest,
        stream: bool,
        keep_usage: bool,
    ) -> tuple[Reply, bytes | _Begun]:
        """The first replica answer to give, trying others while a replica
        fails or refuses before it answered (`_Context.reached` and
        `_Context.worked` say what it may have done meanwhile).

        Args:
            keep_usage: a stream's usage chunk goes to its client: the
                client asked for it, or the endpoint always sends it.

        Returns:
            The reply, and its whole body; for a stream to relay (a 200 to a
            request for one), the reply read up to its first output, whose
            rest is read as it comes.
        """
        deadline = self._clock() + self._options.answer_within_s
        tried: list[Replica] = []
        refused = _Refusals()
        last: UpstreamFailure | None = None
        drops = 0
        for attempt in range(self._options.retries + 1):
            left = deadline - self._clock()
            if attempt and (left <= 0 or left < self._options.least_try_s):
                break  # the request's time is spent (`least_try_s` says why)
            try:
                if route.max_requests_per_replica is None:
                    replica = self._router.choose(route, request, tried)
                    self._acquire(ctx, replica)
                else:
                    found = await self._with_room(ctx, route, request, tried, left)
                    if found is None:
                        break
                    replica = found
                    if not attempt:
                        # Its time to be answered starts now, as for a request
                        # held for a model at zero.
                        deadline = self._clock() + self._options.answer_within_s
                        left = self._options.answer_within_s
                    else:
                        # A retry's wait took from the request's time: the try
                        # has what is left, judged as a try with that much.
                        left = deadline - self._clock()
                        if left < self._options.least_try_s:
                            self._free(ctx, replica)
                            break
            except NoReplica:
                if not attempt:
                    raise
                break
            # A try's timeout is its replica's when the try had nearly the
            # whole read timeout: the first always, a later one when the tries
            # before it took less than the floor, as a refused connection or
            # a 429 at once do. Testing for all of it (6929a0a) judged no
            # retry ever, its `left` read after the clock moved: a wedged
            # replica always tried after one that says 429 was never ejected.
            # A try given the leftover of the request's time ran out of the
            # gateway's time, not its replica's. The allowance is the connect
            # timeout, and a tenth of the read timeout at most: with a short
            # read timeout the floor is half of it, and a retry left with half
            # the time was blamed (3 s read, a 503 after 1.4 s: the healthy
            # replica after it ejected).
            allowance = min(
                self._options.connect_within_s, self._options.answer_within_s / 10
            )
            whole_time = (
                not attempt or left >= self._options.answer_within_s - allowance
            )
            # Likewise a connection: a retry given less than the connect
            # timeout (a floor under it, for a short read timeout) may have
            # been cut short by the deadline. The first try has as long as any.
            connect_cut = bool(attempt) and left < self._options.connect_within_s
            tried.append(replica)
            reply: Reply | None = None
            try:
                reply = await self._upstream.post(
                    replica.url + ctx.call.path, body, headers, left
                )
                ctx.reached = True
                data: bytes | _Begun
                if stream and reply.status == 200:
                    data = await self._begin(ctx, reply, keep_usage, deadline)
                else:
                    data = await self._body(ctx, replica, reply, deadline)
            except UpstreamFailure as err:
                timed_out = isinstance(err, UpstreamTimeout)
                cut = isinstance(err, UpstreamConnectTimeout) and connect_cut
                if (timed_out and not whole_time) or cut:
                    # Judged, a healthy replica tried last with a sliver of the
                    # time would take the blame (and could be ejected) for the
                    # replicas before it that used the rest.
                    self._free(ctx, replica)
                else:
                    self._release(ctx, replica, err)
                last = err
                if timed_out:
                    # Only ever after the request was written (a connection
                    # that timed out is `UpstreamUnreachable`): the replica may
                    # be working on it still, so it stays charged, or a client
                    # whose requests always time out (huge prompts, huge
                    # `max_tokens`) would never meet its token limits.
                    ctx.reached = ctx.worked = True
                    raise BackendTimeout(
                        f"The model `{route.served_name}` did not answer in time."
                    ) from err
                broke_off = reply is not None and isinstance(err, UpstreamBroken)
                if isinstance(err, UpstreamDropped) or broke_off:
                    # Tried on another replica all the same (a replica killed
                    # mid-load must not lose the request; the client saw
                    # nothing of a whole answer that broke off, nor of a stream
                    # that broke before its first event), but charged:
                    # the replica may have generated all of it, and a request
                    # that kills every replica it meets must not be repeatable
                    # past the client's limits (nor take more than
                    # `_DROPS_RETRIED` + 1 replicas down with it).
                    ctx.reached = ctx.dropped = ctx.worked = True
                    drops += 1
                    if drops > _DROPS_RETRIED:
                        break
                elif not isinstance(err, UpstreamUnreachable):
                    ctx.reached = True
                    raise BackendError(
                        f"The model `{route.served_name}` answered with "
                        "something that could not be read."
                    ) from err
                continue
            if isinstance(data, bytes) and reply.status in _UNWORKED:
                # The replica did no work: free to try another. A 503 counts
                # as its failure (it is not serving). A 429 judges nothing: the
                # replica is serving, at capacity, which says nothing of its
                # health; counted a success, a sidecar's 429 would heal a
                # replica on its trial after an ejection.
                if reply.status == 503:
                    failure = UpstreamFailure(f"status {reply.status}")
                    self._release(ctx, replica, failure)
                else:
                    self._free(ctx, replica)
                refused.add(reply, data)
                continue
            return reply, data
        # The failure's own text names the pod's address: logged with the
        # replica (_release), not told to clients.
        if ctx.dropped:
            # A replica may have crashed on it, whatever the others said: a
            # 502 (which 5xx alerts see), with its estimate charged. A 429 or
            # 503 would say the model is only busy.
            if isinstance(last, UpstreamDropped):
                why = "the replica closed the connection without answering"
            else:
                why = "the answer broke off"
            raise BackendError(f"No replica of `{route.served_name}` answered ({why}).")
        if refused.statuses:
            raise refused.error(route.served_name, len(tried))
        # Nothing reached a replica (every connection failed, or the time ran
        # out): as for a model with none ready, the client may come back, and
        # is charged nothing.
        raise NoReplica(
            f"No replica of `{route.served_name}` could be reached; try again shortly.",
            retry_after_s=NO_REPLICA_RETRY_S,
        )

    async def _with_room(
        self,
        ctx: _Context,
        route: ModelRoute,
        request: RouteRequest,
        tried: list[Replica],
        left: float,
    ) -> Replica | None:
        """A replica of `route`, which has `maxRequestsPerReplica`, with room
        for a try of the request (`_queued`); None for a retry (`tried` not
        empty) that found none within the time `left` of the request.

        A first try waits up to the queue timeout; a retry no longer, and
        within the request's time. A fallback's request waits not at all: the
        next fallback, or the hold for the model asked for, may answer sooner.

        Raises:
            NoReplica: no replica at all; or a fallback's with none with room
                (its request goes on to the next fallback).
            ModelOverloaded: a first try that found no room in time.
        """
        within = self._options.queue_within_s
        if tried:
            within = min(within, left)
        if ctx.fallback is not None:
            within = 0
        found, bound = await self._queued(
            ctx, route, request, tried, within, observe=not tried
        )
        if found is not None or tried:
            return found
        if ctx.fallback is not None:
            raise NoReplica(
                f"Every replica of `{route.served_name}` has its "
                "maxRequestsPerReplica requests.",
                retry_after_s=1,
            )
        raise self._overloaded(route, bound)

    async def _queued(
        self,
        ctx: _Context,
        route: ModelRoute,
        request: RouteRequest,
        tried: list[Replica],
        within_s: float,
        *,
        observe: bool,
    ) -> tuple[Replica | None, int | None]:
        """A replica of `route` with room for the request, not in `tried`,
        taken (counted in flight) in its turn (`ReplicaQueue.take`): counted
        as queued meanwhile (demand the operator's autoscaler reads, as it
        reads requests held for a model at zero, which are waiting). None
        when none had room within `within_s`. With the bound the request was
        held to at its last look.

        Args:
            observe: a wait goes into `queue_wait_seconds` (a request's first
                wait only: a retry's is not another request's).

        Each look reads the bound of the model's route in force then: one
        raised or dropped while requests wait applies to them. A sheddable
        request's bound is less the places kept for standard requests
        (`ModelRoute.reserved_per_replica`).

        Raises:
            NoReplica: the model has no replica left to try.
        """
        identity: ModelIdentity = (route.namespace, route.name)
        held_to: int | None = None

        def take() -> Replica | None:
            nonlocal held_to
            current = self._catalog.route_named(route.served_name)
            if current is None or (current.namespace, current.name) != identity:
                current = route
            bound = current.max_requests_per_replica
            if bound is not None and ctx.priority is Priority.SHEDDABLE:
                # The places kept for standard requests are not its to take.
                bound -= current.reserved_per_replica or 0
            held_to = bound
            if bound is None:
                replica: Replica | None = self._router.choose(current, request, tried)
            else:
                replica = self._router.choose_with_room(current, request, tried, bound)
            if replica is not None:
                self._acquire(ctx, replica)
            return replica

        demand = self._metrics.model_requests
        demand.add(identity, STATE_QUEUED, 1)
        start = self._clock()
        try:
            replica, waited = await self._queue.take(
                identity, ctx.priority, take, within_s, excludes=bool(tried)
            )
        finally:
            demand.add(identity, STATE_QUEUED, -1)
        if waited and observe:
            self._metrics.queue_wait.labels(ctx.model, ctx.priority.value).observe(
                self._clock() - start
            )
        return replica, held_to

    def _overloaded(self, route: ModelRoute, bound: int | None) -> ModelOverloaded:
        """The 503 of a request that found no replica with room in time, held
        to `bound` requests a replica."""
        within = self._options.queue_within_s
        waited = f" for {within:g} s" if within > 0 else ""
        whose = "its maxRequestsPerReplica"
        if bound != route.max_requests_per_replica:
            whose += " less its reservedPerReplica, for sheddable requests"
        return ModelOverloaded(
            f"The model `{route.served_name}` is overloaded: every replica had "
            f"{bound} requests ({whose}){waited}. Retry later.",
            retry_after_s=1,
        )

    async def _body(
        self, ctx: _Context, replica: Replica, reply: Reply, deadline: float
    ) -> bytes:
        """A reply's whole body, by the request's `deadline`.

        Only an answer's body (a status below 400) is the answer: one that
        breaks off or does not come in time is a failure to handle (a drop, a
        504). Any other body only explains its status, which says all that
        matters (a 429 or 503: no work done, another replica is tried; another
        4xx: the caller's error; a 5xx: the server's), so one that cannot be
        read is taken as empty: a refusal whose body broke off was answered as
        a drop (a 502, its estimate charged, the one retry after a drop used).

        An error's body gets half of `ProxyOptions.least_try_s` at most, not
        the request's time: it is a few hundred bytes a server writes with its
        headers (vLLM does), so one not in by then has stalled, and a 429 or
        503 whose body stalled ate the whole read timeout, leaving none for
        another replica. Half, so that the retry after a refusal answered at
        once still has the floor left, and nearly the whole read timeout (its
        timeout judges its replica), even where the floor is half of it.

        Raises:
            UpstreamFailure: an answer's body could not be read.
        """
        within = max(0.0, deadline - self._clock())
        if reply.status >= 400:
            within = min(within, self._options.least_try_s / 2)
        try:
            return await reply.read(within)
        except UpstreamFailure as err:
            if reply.status < 400:
                raise
            log.warning(
                "replica's error body unread",
                extra={
                    "request_id": ctx.request_id,
                    "replica": replica.url,
                    "status": reply.status,
                    "error": str(err),
                },
            )
            return b""

    async def _begin(
        self, ctx: _Context, reply: Reply, keep_usage: bool, deadline: float
    ) -> _Begun:
        """A stream's reply read up to its first output, by the request's
        `deadline` (as a whole answer's body is), before its door commits a
        200.

        A replica that fails before then (killed during prefill, its
        connection reset) sent nothing the client would see, as one whose
        whole answer broke off: another replica may answer it (`_send`).
        Relayed from its headers on, the client got a 200 and an error event
        with nothing of the answer. Events a replica sends before it worked
        on the request (`ApiCall.held`: a Responses stream's
        `response.created`) are no output: held back, they go out with the
        first output, so a client never sees those of a replica that failed.
        The first output is handed on as it comes
        (TTFT observed then, as the relay did); a break after it ends the
        stream with an error event.

        Raises:
            UpstreamFailure: the body broke off before the first output, or
                none came by the deadline (`UpstreamTimeout`).
        """
        events = EventFilter(keep_usage, ctx.call.held, ctx.call.closing)
        # The deadline bounds the reads the upstream client waits on anyway,
        # each within the read timeout: a timer of its own (asyncio.timeout)
        # cost each streamed request 11 us of CPU, a sixth of the proxy's.
        chunks = reply.chunks(max(0.0, deadline - self._clock()))
        first = b""
        try:
            async for chunk in chunks:
                first = events.feed(chunk)
                if first:
                    if events.began:
                        self._time_first_token(ctx, events)
                    break  # the rest is the relay's, on the same body
            else:
                first = events.finish()  # it ended with no complete event
                if events.holding:
                    # Only opening events, sent before any work (a Responses
                    # stream's): no answer began, another replica may give one.
                    raise UpstreamBroken("the stream ended before its first output")
        except BaseException:
            # A failure, the deadline (`UpstreamTimeout`) or a client that
            # left: the body left unread, its connection cannot be reused.
            reply.close()
            raise
        reply.lift()  # the rest may take as long as it has something to say
        return _Begun(reply, events, chunks, first, _error_event_of(ctx, events))

    def _time_first_token(self, ctx: _Context, events: EventFilter) -> None:
        """Observes the time to the first token, now that the answer began,
        unless its first data was an error standing for it."""
        if events.first_error is None:
            self._metrics.ttft.labels(ctx.model).observe(self._clock() - ctx.started)

    async def _whole(
        self,
        ctx: _Context,
        response: Reply,
        data: bytes,
        headers: dict[str, str],
        read: Reader | None,
    ) -> ProxyResponse:
        replica = ctx.replica
        assert replica is not None
        if response.status >= 500:
            self._release(ctx, replica, UpstreamFailure(f"status {response.status}"))
            raise BackendError(
                f"The model's server failed with status {response.status}."
            )
        self._release(ctx, replica, None)
        usage = usage_of_body(data) if response.status == 200 else Usage()
        if response.status != 200 and ctx.worked:
            # The replica before this one dropped the request (or broke off
            # its answer): it may have generated all of it, so the estimate
            # stays charged, as when no other replica answers (`_settle`).
            usage = None
        if read is not None and response.status == 200:
            try:
                read(data)
            except GatewayError as err:
                # The replica did the work it reports: its tokens stay charged,
                # as for an answer the door could use.
                await self._fail(ctx, err, usage, answered=True)
                raise
        admitted = ctx.admission
        await self._account(ctx, usage, response.status, None, answered=True)
        content_type = response.content_type
        if response.status != 200 and admitted is not None:
            # An error the replica answered (vLLM's 400) used nothing: its
            # estimate was given back (unless a replica before dropped it),
            # which its headers must show, as those of an error the gateway
            # raises do (`_fail`).
            headers = {**headers, **admitted.headers_after(ctx.settled)}
        if response.status != 200 and response.retry_after is not None:
            headers = {**headers, "retry-after": response.retry_after}
        shaped = refusal_json(response.status, data) if response.status >= 400 else None
        if shaped is not None:
            # Not OpenAI's error object (old vLLM's flat one, a proxy's plain
            # text or HTML page in front of it): in OpenAI's shape, as every
            # door's client expects, still counted with the replica's status.
            data, content_type = shaped, "application/json"
        return ProxyResponse(response.status, headers, data, media_type=content_type)

    def _relay(self, ctx: _Context, begun: _Begun) -> Closing[bytes]:
        """The reply's SSE events, its first output then the rest as they
        arrive; accounts once the stream ends or is closed, read or not."""
        replica = ctx.replica
        assert replica is not None
        response, events = begun.reply, begun.events

        async def unread() -> None:
            await self._end_relay(ctx, response, replica, events, None, gone=True)

        return Closing(self._forward(ctx, begun, replica), unread)

    async def _forward(
        self, ctx: _Context, begun: _Begun, replica: Replica
    ) -> AsyncGenerator[bytes, None]:
        """Forwards SSE events as they arrive; accounts when the stream ends."""
        response, events = begun.reply, begun.events
        failure: UpstreamFailure | None = None
        gone = False
        try:
            if begun.first:
                yield begun.first
            # Begun with a keep-alive: TTFT when the answer itself begins (not
            # at an error that stands for it).
            timed = events.began
            async for chunk in begun.chunks:
                out = events.feed(chunk)
                if not timed and events.began:
                    timed = True
                    self._time_first_token(ctx, events)
                if out:
                    yield out
            rest = events.finish()
            if not timed and events.began:
                self._time_first_token(ctx, events)
            if rest:
                yield rest
            if not events.began:
                # Begun with a keep-alive, then nothing: no answer at all.
                raise UpstreamBroken("the stream ended without an answer")
            if not events.ended:
                # Its closing event never came (the openai client's stream
                # helper would fail on its own, saying less): as a break.
                raise UpstreamBroken("the stream ended without its closing event")
        except UpstreamFailure as err:
            failure = err
            gateway_error = (
                BackendTimeout("The model stopped answering.")
                if isinstance(err, UpstreamTimeout)
                else BackendError(f"The model's stream broke off ({err}).")
            )
            yield begun.error_event(gateway_error.body())
        except (asyncio.CancelledError, GeneratorExit):
            # Stopped from outside: the client went away mid-stream.
            gone = True
            raise
        finally:
            await self._end_relay(ctx, response, replica, events, failure, gone)

    async def _end_relay(
        self,
        ctx: _Context,
        response: Reply,
        replica: Replica,
        events: EventFilter,
        failure: UpstreamFailure | None,
        gone: bool,
    ) -> None:
        response.close()
        if gone and failure is None:
            # The client left (or the server cut the stream): the replica's
            # stream may have been as good as a stalled one, so it is judged on
            # neither, as a cancelled whole answer is not (`_abandon`). Counted
            # a success, a replica that stalls mid-stream would be healed by
            # every client that gives up on it.
            self._free(ctx, replica)
        else:
            self._release(ctx, replica, failure)
        status, code = 200, None
        if ctx.unusable is not None:
            # The door ends its call with an error for what it was sent (a
            # chunk it cannot use, or the error event of a stream that broke):
            # counted as that, what its client gets. REST's client got a 200.
            status, code = ctx.unusable.status, ctx.unusable.code
        elif events.error is not None:
            # The replica's own error event (vLLM's, when generation fails),
            # relayed to REST's client after its 200: still a 200, but with
            # the code the other doors count it as, so the log shows a failure.
            code = refusal(502, events.error).code
        if failure:
            code = "stream_broken"
        elif gone and code is None:
            code = "shutting_down" if self.cut else "client_closed"
        # A stream that broke, one the door could not use, or a client that
        # left, before the usage chunk: the replica may have generated all of it.
        await self._account(
            ctx, events.usage, status, code, answered=True, relayed=events.count
        )

    async def _account(
        self,
        ctx: _Context,
        usage: Usage | None,
        status: int,
        code: str | None,
        *,
        answered: bool = False,
        relayed: int = 0,
    ) -> None:
        """Settles the request's tokens, then counts it. A client that leaves
        meanwhile (right after its answer) cancels this task: neither may be cut
        short with it, so the settle runs on in a task of its own when it may
        wait on the store (Redis), and the count comes in a finally."""
        settle = self._settle(ctx, usage, answered=answered, relayed=relayed)
        try:
            admission = ctx.admission
            if admission is not None and admission.settles_in_store(ctx.reached):
                await self._shielded(settle)
            else:
                await settle
        finally:
            self._finish(ctx, status, code)

    async def _fail(
        self,
        ctx: _Context,
        error: GatewayError,
        usage: Usage | None = None,
        *,
        answered: bool = False,
    ) -> None:
        """Counts a request that ends in `error` (once: a failure counted where
        it happened passes through `handle` after), and gives `error` the
        `x-ratelimit-*` headers as they stand once its tokens are settled."""
        if ctx.finished:
            return
        admitted = ctx.admission
        await self._account(ctx, usage, error.status, error.code, answered=answered)
        if admitted is not None:
            limits = admitted.headers_after(ctx.settled)
            error.headers = {**limits, **error.headers}

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Awaits `work` in a task of its own that a cancel of this one spares."""
        task = asyncio.create_task(work)
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)
        return await asyncio.shield(task)

    def _acquire(self, ctx: _Context, replica: Replica) -> None:
        ctx.replica, ctx.holding = replica, True
        ctx.ejections = replica.ejections
        replica.in_flight += 1
        self._metrics.in_flight.labels(ctx.replica_model, replica.url).inc()
        self._metrics.model_requests.add(_identity(ctx), STATE_IN_FLIGHT, 1)

    def _release(
        self, ctx: _Context, replica: Replica, failure: UpstreamFailure | None
    ) -> None:
        # Judged before it is freed: freeing offers it to the requests queued
        # for the model, which must not get a replica this failure ejects.
        try:
            self._judge(ctx, replica, failure)
        finally:
            self._free(ctx, replica)

    def _judge(
        self, ctx: _Context, replica: Replica, failure: UpstreamFailure | None
    ) -> None:
        if failure is None:
            replica.record_success(self._clock(), ctx.ejections)
            return
        self._metrics.backend_errors.labels(
            ctx.replica_model, replica.url, failure.kind
        ).inc()
        log.warning(
            "replica failed",
            extra={
                "request_id": ctx.request_id,
                "replica": replica.url,
                "error": str(failure),
            },
        )
        ejection = self._options.ejection
        if replica.record_failure(self._clock(), ejection, ctx.ejections):
            self._metrics.ejections.labels(ctx.replica_model, replica.url).inc()
            log.warning("replica ejected", extra={"replica": replica.url})

    def _abandon(self, ctx: _Context) -> None:
        """Frees the replica of a cancelled request and counts it (499, or 503
        when the server cut it at the end of its shutdown grace)."""
        self._let_go(ctx)
        ctx.admission = None
        if self.cut:
            self._finish(ctx, ShuttingDown.status, ShuttingDown.code)
        else:
            self._finish(ctx, 499, "cancelled")

    def _let_go(self, ctx: _Context) -> None:
        """Frees the replica, if the request still holds one, judging nothing."""
        if ctx.holding and ctx.replica is not None:
            self._free(ctx, ctx.replica)

    def _free(self, ctx: _Context, replica: Replica) -> None:
        ctx.holding = False
        replica.in_flight -= 1
        self._metrics.in_flight.labels(ctx.replica_model, replica.url).dec()
        identity = _identity(ctx)
        self._metrics.model_requests.add(identity, STATE_IN_FLIGHT, -1)
        # Room for the first request queued for the model, if any waits.
        self._queue.offer(identity)

    async def _settle(
        self,
        ctx: _Context,
        usage: Usage | None,
        *,
        answered: bool = False,
        relayed: int = 0,
    ) -> None:
        """Corrects the token buckets and counts tokens and cost.

        Args:
            usage: what the reply reported; None when it reported nothing.
            answered: a replica answered. Without a usage its estimate stands
                (refunding it would let a client that leaves before the usage
                chunk, or a reply without one, use tokens past its limits);
                a request that failed before any answer used nothing, unless
                a replica may have worked on it (`_Context.worked`: it dropped
                it, or timed out after it was written).
            relayed: stream events relayed. Without a usage at least one token
                each is charged: a client that reads a long stream and leaves
                before its usage chunk would otherwise pay only the estimate
                (256 tokens without `max_tokens`, where vLLM goes on to the end
                of the context).
        """
        admission, ctx.admission = ctx.admission, None
        if admission is None:
            return
        if usage is not None:
            used = usage.total
        else:
            charged = answered or ctx.worked
            used = max(admission.estimate, relayed) if charged else 0
        try:
            ctx.settled = await self._limiter.settle(
                admission, used, served=ctx.reached
            )
        except Exception:  # the reply is served; a limit store hiccup must not fail it
            log.exception("could not settle token use", extra=self._log_fields(ctx))
        if usage is None or ctx.route is None:
            return
        key = self._metrics.key_label(ctx.principal.name)
        self._metrics.tokens.labels(ctx.model, key, "prompt").inc(usage.prompt)
        self._metrics.tokens.labels(ctx.model, key, "completion").inc(usage.completion)
        price = ctx.route.pricing
        cost = (
            usage.prompt * price.prompt_per_million
            + usage.completion * price.completion_per_million
        ) / 1_000_000
        if cost > 0:
            self._metrics.cost.labels(ctx.model, key).observe(cost)

    def refused(
        self,
        call: ApiCall,
        request_id: str,
        error: GatewayError,
        door: Door,
        principal: Principal | None = None,
    ) -> None:
        """Counts and logs a request its door refused before `handle`: no key or
        a bad one, a body over the limit. Without it a flood of bad keys would
        not show in the request metrics."""
        self._count_early(call, request_id, door, principal, error.status, error.code)

    def left(
        self,
        call: ApiCall,
        request_id: str,
        door: Door,
        principal: Principal | None = None,
    ) -> None:
        """Counts and logs a request whose client left before `handle` (499)."""
        self._count_early(call, request_id, door, principal, 499, "client_closed")

    def _count_early(
        self,
        call: ApiCall,
        request_id: str,
        door: Door,
        principal: Principal | None,
        status: int,
        code: str | None,
    ) -> None:
        who = principal if principal is not None else Principal(None)
        ctx = _Context(call, who, request_id, self._clock(), door=door)
        self._finish(ctx, status, code)

    def _finish(self, ctx: _Context, status: int, code: str | None) -> None:
        if ctx.finished:  # counted already; a cancel after that changes nothing
            return
        ctx.finished = True
        elapsed = self._clock() - ctx.started
        key = self._metrics.key_label(ctx.principal.name)
        kind = ctx.call.kind.value
        labels = (kind, ctx.model, str(status), key, ctx.door.value)
        self._metrics.requests.labels(*labels).inc()
        if status == 200 and code is not None and code != "client_closed":
            # A stream that failed after its 200 (only REST's client gets one:
            # the other doors end with the error's status): the error ratio
            # must see it though the client's status says success.
            self._metrics.stream_errors.labels(kind, ctx.model, code).inc()
        self._metrics.latency.labels(kind, ctx.model).observe(elapsed)
        fields = self._log_fields(ctx)
        fields.update(status=status, duration_ms=round(elapsed * 1000, 3))
        if code:
            fields["code"] = code
        if ctx.fallback_from is not None:
            # The model asked for, where a fallback (`model`) answered.
            fields["fallback_from"] = ctx.fallback_from
        if ctx.split_from is not None:
            # The model asked for, whose split sent it to `model` (or to the
            # model whose fallback then answered).
            fields["split_from"] = ctx.split_from
        if ctx.priority is not Priority.STANDARD:
            fields["priority"] = ctx.priority.value
        log.info("request", extra=fields)

    @staticmethod
    def _log_fields(ctx: _Context) -> dict[str, object]:
        return {
            "request_id": ctx.request_id,
            # `api`, as the metrics' label (which could not be `endpoint`: the
            # Prometheus Operator sets its own), so logs and metrics join.
            "api": ctx.call.kind.value,
            "door": ctx.door.value,
            "model": ctx.model,
            "key": ctx.principal.name,
            # With the replica, traces where each conversation went (a move to
            # another replica costs its prefix cache).
            "session": ctx.session,
            "replica": ctx.replica.url if ctx.replica else None,
        }
