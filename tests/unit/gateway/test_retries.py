"""The proxy's tries on a model's replicas: which failures it tries again on
another replica, how often, for how long, and what the client gets when none
answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from citadel.gateway.errors import BackendTimeout, GatewayError
from citadel.gateway.services.buckets import InProcessBuckets
from citadel.gateway.services.limits import Limiter, estimate_tokens
from citadel.gateway.services.proxy import ProxyOptions, ProxyService
from citadel.gateway.services.requests import CHAT, Door
from citadel.gateway.services.routing import Router
from citadel.gateway.services.structured import ask
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.upstream import (
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamDropped,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from citadel.gateway.wiring import proxy_options

pytestmark = pytest.mark.unit

THREE = ("http://r1", "http://r2", "http://r3")
TPM = {"tpm": 10_000}


def _refusal(kit: Any, status: int, retry_after: str | None = None) -> Any:
    said = {"error": {"message": f"The replica said {status}.", "type": "x"}}
    return kit.reply(status, orjson.dumps(said), retry_after=retry_after)


def _replica(harness: Any, url: str) -> Any:
    return harness.deps.catalog.all_replicas()[url]


def _backend_errors(harness: Any, url: str, kind: str) -> float | None:
    labels = {"model": "smollm2", "replica": url, "kind": kind}
    sample = harness.deps.metrics.registry.get_sample_value
    return sample("citadel_gateway_backend_errors_total", labels)  # type: ignore[no-any-return]


@pytest.mark.parametrize("status", [503, 429])
async def test_a_replica_that_refuses_unworked_hands_the_request_on(
    kit: Any, status: int
) -> None:
    """A 503 or 429 says the replica did nothing with the request: another
    one answers it, and the client never hears of the refusal."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: (
        _refusal(kit, status, "7") if "r1" in url else kit.completion()
    )
    async with harness.client() as client:
        answers = [
            await client.post("/v1/chat/completions", json=kit.chat) for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert all("retry-after" not in a.headers for a in answers)
    urls = [call[0] for call in harness.upstream.calls]
    assert len(urls) == 3 and sum("r1" in url for url in urls) == 1
    assert kit.counted(harness, "200") == 2
    # A 503 is the replica's failure (counted once, for ejection); a 429 is a
    # replica at capacity, serving.
    failed = _backend_errors(harness, "http://r1", "protocol")
    assert failed == (1 if status == 503 else None)
    assert _replica(harness, "http://r1").failures == (1 if status == 503 else 0)


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        ([(429, "7"), (429, "3")], (429, "rate_limit_exceeded", "3")),
        ([(503, "7"), (429, "9")], (503, "model_not_ready", "7")),
        ([(503, None), (503, None)], (503, "model_not_ready", "5")),
        ([(429, None), (429, "x")], (429, "rate_limit_exceeded", "5")),
    ],
    ids=["all 429", "503 and 429", "503s that say nothing", "429s without seconds"],
)
async def test_when_every_replica_refuses_the_client_comes_back_at_the_soonest(
    kit: Any,
    said: list[tuple[int, str | None]],
    expected: tuple[int, str, str],
) -> None:
    """A 429 only when each replica said so (the model is at capacity), else
    a 503; either in OpenAI's shape with the shortest `Retry-After` a replica
    gave, else the gateway's own for a model with no replica ready (5 s). No
    replica worked on it: its tokens are given back."""
    harness = kit.build(doc=kit.document(limits=TPM))
    replies = {f"http://r{n}": _refusal(kit, *s) for n, s in enumerate(said, 1)}
    harness.upstream.handler = lambda url, body: replies[url[:9]]
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    status, code, retry_after = expected
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == code
    if status == 429:
        assert error["message"] == "The replica said 429."
    assert answer.headers["retry-after"] == retry_after
    assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"
    assert len(harness.upstream.calls) == 2
    assert kit.counted(harness, str(status)) == 1


async def test_every_replicas_429_is_the_same_refusal_on_every_door(
    kit: Any,
) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: _refusal(kit, 429, "7")
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(GatewayError) as refused:
        await ask(harness.deps.proxy, CHAT, principal, dict(kit.chat), "r", Door.GRPC)
    error = refused.value
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert error.headers["retry-after"] == "7"
    assert len(harness.upstream.calls) == 2


async def test_a_stream_refused_unworked_is_handed_on(kit: Any) -> None:
    """Nothing of a stream reached the client before its headers: a 503 is
    tried elsewhere as for a whole answer."""
    harness = kit.build()
    events = [b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"]
    harness.upstream.handler = lambda url, body: (
        _refusal(kit, 503) if "r1" in url else kit.reply(parts=events)
    )
    async with harness.client() as client:
        for _ in range(2):
            answer = await client.post(
                "/v1/chat/completions", json={**kit.chat, "stream": True}
            )
            assert answer.status_code == 200
            assert answer.text.endswith("data: [DONE]\n\n")


async def test_a_whole_answer_that_breaks_off_is_tried_again(kit: Any) -> None:
    """The client saw nothing of it: another replica answers."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: (
        kit.reply(body=UpstreamBroken("the response broke off"))
        if "r1" in url
        else kit.completion()
    )
    async with harness.client() as client:
        answers = [
            await client.post("/v1/chat/completions", json=kit.chat) for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert len(harness.upstream.calls) == 3
    assert _backend_errors(harness, "http://r1", "protocol") == 1


async def test_a_whole_answer_broken_off_everywhere_stays_charged(kit: Any) -> None:
    """Its replicas may have generated all of it: the estimate stays charged,
    as for a dropped request."""
    harness = kit.build(doc=kit.document(limits=TPM))
    harness.upstream.handler = lambda url, body: kit.reply(
        body=UpstreamBroken("the response broke off at 10.0.0.7")
    )
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 502
    assert "broke off" in answer.json()["error"]["message"]
    assert "10.0.0.7" not in answer.text
    assert len(harness.upstream.calls) == 2
    left = 10_000 - estimate_tokens(dict(kit.chat), CHAT, 256)
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(left)


@pytest.mark.parametrize(
    "second",
    [UpstreamDropped("closed"), UpstreamBroken("the response broke off")],
    ids=["dropped", "broken off"],
)
async def test_a_request_that_may_crash_replicas_takes_down_two_at_most(
    kit: Any, second: Exception
) -> None:
    """A request that crashes vLLM would take down every replica it is tried
    on: after a second one dropped it (or broke off its answer), it is not
    tried again however many retries are left."""
    harness = kit.build(replicas=THREE, retries=2)
    failures = [UpstreamDropped("closed"), second]

    def handler(url: str, body: Any) -> Any:
        failure = failures.pop(0)
        return (
            kit.reply(body=failure) if isinstance(failure, UpstreamBroken) else failure
        )

    harness.upstream.handler = handler
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_error"
    assert len(harness.upstream.calls) == 2


async def test_a_dropped_request_still_gets_its_retries_past_unreachable_ones(
    kit: Any,
) -> None:
    """Only drops are capped: a replica that cannot be reached never had it."""
    harness = kit.build(replicas=THREE, retries=2)
    replies: list[Any] = [
        UpstreamDropped("closed"),
        UpstreamUnreachable("refused"),
        kit.completion(),
    ]
    harness.upstream.handler = lambda url, body: replies.pop(0)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 200


async def test_when_no_replica_can_be_reached_the_client_is_told_to_come_back(
    kit: Any,
) -> None:
    """As for a model with no replica ready: a 503 with `Retry-After`, and
    nothing charged (the request never got to a replica)."""
    harness = kit.build(doc=kit.document(limits={"rpm": 5, **TPM}))
    harness.upstream.handler = lambda url, body: UpstreamUnreachable(
        "cannot connect to 10.0.0.7:8000"
    )
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert answer.headers["retry-after"] == "5"
    assert "10.0.0.7" not in answer.text
    assert answer.headers["x-ratelimit-remaining-requests"] == "5"
    assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"
    assert kit.counted(harness, "503") == 1


async def test_every_try_shares_one_deadline(kit: Any) -> None:
    """Each try gets what is left of the read timeout since the first began,
    and none starts once it is spent: not the whole read timeout each, which
    made (retries + 1) x 600 s."""
    harness = kit.build(replicas=THREE, retries=2)

    def slow_and_gone(url: str, body: Any) -> Any:
        harness.clock.now += 400  # each try takes 400 s, then fails
        return UpstreamDropped("closed") if "r1" in url else UpstreamUnreachable("x")

    harness.upstream.handler = slow_and_gone
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert harness.upstream.timeouts == [600.0, 200.0]
    assert answer.status_code == 502  # the first dropped it


async def test_a_whole_answers_body_shares_the_deadline(kit: Any) -> None:
    harness = kit.build()
    given: list[float | None] = []

    class Slow(kit.reply):  # type: ignore[misc]
        async def read(self, timeout_s: float | None = None) -> bytes:
            given.append(timeout_s)
            body: bytes = await super().read(timeout_s)
            return body

    def slow(url: str, body: Any) -> Any:
        harness.clock.now += 250  # the headers took 250 s
        return Slow(body=kit.completion().body)

    harness.upstream.handler = slow
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 200
    assert given == [350.0]


@pytest.mark.parametrize("read", [True, False], ids=["mid-stream", "unread"])
async def test_a_client_leaving_a_stream_judges_no_replica(
    kit: Any, read: bool
) -> None:
    """A client that gives up on a stalled stream says nothing of the
    replica: counted a success, each one reset the replica's failures, so
    one that stalls mid-stream was never ejected."""
    harness = kit.build()
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    harness.upstream.handler = lambda url, body: kit.reply(parts=[chunk] * 3)
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "stream": True})
    result = await harness.deps.proxy.handle(CHAT, principal, raw, "r-1")
    (url, _, _) = harness.upstream.calls[0]
    state = _replica(harness, url[:9])
    state.failures = 2
    if read:
        await anext(result.stream)
    await result.stream.aclose()
    assert state.failures == 2
    assert state.in_flight == 0
    assert kit.counted(harness, "200") == 1


async def test_a_stream_read_to_its_end_still_heals_its_replica(kit: Any) -> None:
    harness = kit.build()
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=[chunk, b"data: [DONE]\n\n"]
    )
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "stream": True})
    result = await harness.deps.proxy.handle(CHAT, principal, raw, "r-1")
    (url, _, _) = harness.upstream.calls[0]
    state = _replica(harness, url[:9])
    state.failures = 2
    async for _ in result.stream:
        pass
    assert state.failures == 0


async def _stream_then_eject(kit: Any, harness: Any, end: bytes | Exception) -> Any:
    """A stream taken on the lone replica `http://r1`, ending with `end` once
    read, and three requests after it that fail (503) and eject the replica."""
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    harness.upstream.handler = lambda url, body: (
        kit.reply(parts=[chunk, end]) if body.get("stream") else _refusal(kit, 503)
    )
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "stream": True})
    result = await harness.deps.proxy.handle(CHAT, principal, raw, "r-1")
    for _ in range(3):
        with pytest.raises(GatewayError):
            await harness.deps.proxy.handle(
                CHAT, principal, orjson.dumps(kit.chat), "r-1"
            )
    state = _replica(harness, "http://r1")
    assert state.ejected_until == harness.clock.now + 5
    return result.stream


async def test_a_stream_sent_before_an_ejection_does_not_heal_its_replica_after(
    kit: Any,
) -> None:
    """A stream that outlasts its replica's ejection and ends well says nothing
    of the replica since: counted, it healed it, so the failed trial after
    did not eject it again and the back-off started over instead of doubling."""
    harness = kit.build(replicas=("http://r1",))
    stream = await _stream_then_eject(kit, harness, b"data: [DONE]\n\n")
    state = _replica(harness, "http://r1")
    harness.clock.now += 30
    async for _ in stream:
        pass
    assert (state.ejections_in_row, state.in_flight) == (1, 0)
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(GatewayError):  # the trial fails: ejected for 10 s
        await harness.deps.proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    assert state.ejected_until == harness.clock.now + 10


async def test_a_stream_sent_before_an_ejection_that_breaks_after_it_is_no_trial(
    kit: Any,
) -> None:
    """A stream that outlasts its replica's ejection and breaks off is not the
    trial after it: taken for one, it ejected the replica again, for twice as
    long, before any request was sent to it."""
    harness = kit.build(replicas=("http://r1",))
    stream = await _stream_then_eject(kit, harness, UpstreamBroken("reset"))
    state = _replica(harness, "http://r1")
    harness.clock.now += 9
    async for _ in stream:
        pass
    assert _backend_errors(harness, "http://r1", "protocol") == 4  # 3 503s, 1 break
    assert state.available(harness.clock.now)
    assert (state.failures, state.ejections_in_row, state.in_flight) == (0, 1, 0)


@pytest.mark.parametrize(
    ("status", "code"), [(429, "rate_limit_exceeded"), (404, "model_not_found")]
)
async def test_a_refusal_that_is_not_openais_is_put_in_its_shape(
    kit: Any, status: int, code: str
) -> None:
    """A proxy in front of the replica (a sidecar's plain-text 429, an HTML
    404 page) refuses in its own words: REST's client gets OpenAI's error
    object, as the other doors' do, quoting the text."""
    harness = kit.build(replicas=("http://r1",))
    plain = kit.reply(
        status, b"<h1>local_rate_limited</h1>", "text/html", retry_after="2"
    )
    harness.upstream.handler = lambda url, body: plain
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == code
    assert "local_rate_limited" in error["message"] and "<" not in error["message"]
    assert answer.headers["retry-after"] == "2"
    assert kit.counted(harness, str(status)) == 1


def _estimate(kit: Any) -> int:
    return estimate_tokens(dict(kit.chat), CHAT, 256)


async def test_a_retry_cut_short_by_the_deadline_judges_no_replica(
    kit: Any,
) -> None:
    """A replica tried with what the ones before it left of the request's time
    (100 s of 600 s) ran out of the gateway's time, not its own: the client
    gets its 504, the replica no failure towards its ejection."""
    harness = kit.build()
    timeouts: list[Exception] = [UpstreamTimeout("no answer in 100 s")]

    def handler(url: str, body: Any) -> Any:
        if not timeouts:
            raise AssertionError("a third try")
        if len(harness.upstream.calls) == 1:
            harness.clock.now += 500  # the first worked 500 s, then died
            return UpstreamDropped("closed")
        return timeouts.pop()

    harness.upstream.handler = handler
    for url in ("http://r1", "http://r2"):
        _replica(harness, url).failures = 2  # one more failure ejects either
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "backend_timeout"
    assert harness.upstream.timeouts == [600.0, 100.0]
    first, second = (call[0][:9] for call in harness.upstream.calls)
    assert _replica(harness, first).ejections_in_row == 1  # it dropped it
    late = _replica(harness, second)
    assert (late.failures, late.ejections_in_row, late.in_flight) == (2, 0, 0)
    assert _backend_errors(harness, second, "timeout") is None


async def test_a_retry_left_half_a_short_read_timeout_judges_no_replica(
    kit: Any,
) -> None:
    """With a read timeout under twice the connect timeout the floor is half of
    it, and so was the allowance for a retry to count as having the whole
    time: a replica tried with 1.6 of 3 s left was blamed for the 503 before it
    that took 1.4 s, and healthy replicas were ejected."""
    settings = GatewaySettings(
        routes_source="file", read_timeout_s=3.0, connect_timeout_s=2.0
    )
    harness = kit.build()
    proxy = _proxy(harness, proxy_options(settings), harness.clock)

    def handler(url: str, body: Any) -> Any:
        if len(harness.upstream.calls) == 1:
            harness.clock.now += 1.4  # a 503 after 1.4 s
            return _refusal(kit, 503)
        return UpstreamTimeout("no answer in 1.6 s")

    harness.upstream.handler = handler
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(BackendTimeout):
        await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    second = harness.upstream.calls[1][0][:9]
    assert _replica(harness, second).failures == 0
    assert _backend_errors(harness, second, "timeout") is None


async def test_a_first_try_that_times_out_is_still_its_replicas_failure(
    kit: Any,
) -> None:
    """The first try has the whole read timeout: its timeout is the replica's."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: UpstreamTimeout("no answer")
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 504
    (url, _, _) = harness.upstream.calls[0]
    assert _replica(harness, url[:9]).failures == 1
    assert _backend_errors(harness, url[:9], "timeout") == 1


def _on_real_clock(harness: Any, options: ProxyOptions) -> ProxyService:
    """A proxy on the harness's parts reading `time.monotonic`, as wired in
    production: it moves between any two reads, where the harness's clock
    stands still until a test moves it."""
    return _proxy(harness, options, time.monotonic)


def _proxy(harness: Any, options: ProxyOptions, clock: Any) -> ProxyService:
    """A proxy on the harness's parts with `options`, reading `clock`."""
    deps = harness.deps
    return ProxyService(
        deps.catalog,
        Router(deps.catalog, clock),
        Limiter(InProcessBuckets(), clock),
        harness.upstream,
        deps.metrics,
        options,
        clock,
    )


async def test_a_first_try_that_times_out_is_its_replicas_on_a_real_clock(
    kit: Any,
) -> None:
    """The first try's time left is read after its deadline was set, so it
    falls short of the read timeout by a hair: taken for a try cut short by
    the deadline, a replica that never answers was never judged, counted or
    ejected."""
    harness = kit.build(replicas=("http://r1",))
    proxy = _on_real_clock(harness, ProxyOptions(retries=2))
    harness.upstream.handler = lambda url, body: UpstreamTimeout("no answer")
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    for _ in range(3):
        with pytest.raises(BackendTimeout):
            await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    state = _replica(harness, "http://r1")
    assert _backend_errors(harness, "http://r1", "timeout") == 3
    assert (state.ejections_in_row, state.in_flight) == (1, 0)  # after 3 in a row


async def test_a_retry_with_nearly_the_whole_time_is_judged_on_a_real_clock(
    kit: Any,
) -> None:
    """A retry after a 429 that came at once had all but a hair of the read
    timeout, so its timeout is its replica's. Judged only with the whole of
    it, which a retry never has on a real clock, a wedged replica always
    tried after one at capacity got 504s for ever and was never ejected."""
    harness = kit.build()  # round robin: each replica first once in two
    proxy = _on_real_clock(harness, ProxyOptions(retries=2))
    harness.upstream.handler = lambda url, body: (
        _refusal(kit, 429) if "r1" in url else UpstreamTimeout("no answer")
    )
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    for _ in range(2):
        with pytest.raises(BackendTimeout):
            await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    assert [call[0][:9] for call in harness.upstream.calls].count("http://r1") == 1
    assert _backend_errors(harness, "http://r2", "timeout") == 2
    assert _replica(harness, "http://r2").failures == 2


@pytest.mark.parametrize(("read_s", "connect_s"), [(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)])
async def test_a_read_timeout_near_the_connect_timeout_still_lets_a_retry_start(
    kit: Any, read_s: float, connect_s: float
) -> None:
    """No retry starts with less left than the connect timeout: one at or
    above the read timeout (both valid settings) let none start after a
    refused connection, which takes next to nothing of it."""
    settings = GatewaySettings(
        routes_source="file", read_timeout_s=read_s, connect_timeout_s=connect_s
    )
    harness = kit.build()
    proxy = _on_real_clock(harness, proxy_options(settings))
    harness.upstream.handler = lambda url, body: (
        UpstreamUnreachable("refused") if "r1" in url else kit.completion()
    )
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    for _ in range(2):  # one of them starts on r1, whichever the first pick
        answer = await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
        assert answer.status == 200
    assert len(harness.upstream.calls) == 3


async def test_a_retrys_connection_cut_short_by_the_deadline_judges_no_replica(
    kit: Any,
) -> None:
    """With a read timeout of 1 s and a connect timeout of 2 s, a retry after
    a 503 that took 0.45 s may connect for 0.55 s only: its connect timeout is
    the deadline's, and its replica (it may connect in 0.7 s) no failure."""
    settings = GatewaySettings(
        routes_source="file", read_timeout_s=1.0, connect_timeout_s=2.0
    )
    harness = kit.build()
    proxy = _proxy(harness, proxy_options(settings), harness.clock)

    def handler(url: str, body: Any) -> Any:
        if len(harness.upstream.calls) == 1:
            harness.clock.now += 0.45
            return _refusal(kit, 503)
        return UpstreamConnectTimeout("connect timeout to 10.0.0.7:8000")

    harness.upstream.handler = handler
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(GatewayError) as caught:
        await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    assert caught.value.status == 503
    assert harness.upstream.timeouts == [1.0, pytest.approx(0.55)]
    late = harness.upstream.calls[1][0][:9]
    assert _backend_errors(harness, late, "connect") is None
    state = _replica(harness, late)
    assert (state.failures, state.in_flight) == (0, 0)


async def test_a_first_connect_timeout_is_still_its_replicas_failure(
    kit: Any,
) -> None:
    """The first try may connect for as long as any: its connect timeout is
    its replica's, whatever the settings."""
    settings = GatewaySettings(
        routes_source="file", read_timeout_s=1.0, connect_timeout_s=2.0
    )
    harness = kit.build(replicas=("http://r1",))
    proxy = _proxy(harness, proxy_options(settings), harness.clock)
    harness.upstream.handler = lambda url, body: UpstreamConnectTimeout("slow")
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(GatewayError):
        await proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-1")
    assert _backend_errors(harness, "http://r1", "connect") == 1


async def test_no_retry_starts_with_less_than_a_connection_may_take(
    kit: Any,
) -> None:
    """With 1 s left (less than the connect timeout, 2 s) a try would mostly
    time out, on the gateway's time: none starts, and the drop before is the
    answer."""
    harness = kit.build(replicas=THREE)

    def dropped_late(url: str, body: Any) -> Any:
        harness.clock.now += 599
        return UpstreamDropped("closed")

    harness.upstream.handler = dropped_late
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert len(harness.upstream.calls) == 1
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_error"


@pytest.mark.parametrize(
    ("said", "retries"),
    [
        ([None, (429, "2"), (429, "2")], 2),
        ([(429, "2"), None], 1),
        ([None, (503, "2"), (503, "2")], 2),
    ],
    ids=["drop then 429s", "429 then drop", "drop then 503s"],
)
async def test_a_drop_among_refusals_is_a_502_and_stays_charged(
    kit: Any, said: list[tuple[int, str] | None], retries: int
) -> None:
    """A replica that dropped the request may have crashed on it: that is
    what the client is told (a 502, which 5xx alerts see), not that the model
    is busy (429, 503); and the estimate stays charged, as it may have
    generated all of it."""
    harness = kit.build(doc=kit.document(limits=TPM), replicas=THREE, retries=retries)
    replies = [
        UpstreamDropped("closed") if s is None else _refusal(kit, *s) for s in said
    ]
    harness.upstream.handler = lambda url, body: replies.pop(0)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert len(harness.upstream.calls) == len(said)
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_error"
    assert "closed the connection" in answer.json()["error"]["message"]
    assert "retry-after" not in answer.headers
    left = 10_000 - _estimate(kit)
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert kit.counted(harness, "502") == 1


async def test_429s_and_a_replica_out_of_reach_are_a_503(kit: Any) -> None:
    """Only a model whose every replica tried said 429 is at capacity."""
    harness = kit.build(retries=1)
    replies = [_refusal(kit, 429, "2"), UpstreamUnreachable("refused")]
    harness.upstream.handler = lambda url, body: replies.pop(0)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert answer.headers["retry-after"] == "2"


@pytest.mark.parametrize(
    "first",
    [UpstreamDropped("closed"), UpstreamBroken("the response broke off")],
    ids=["dropped", "broken off"],
)
async def test_a_refusal_after_a_drop_keeps_the_estimate_charged(
    kit: Any, first: Exception
) -> None:
    """The replica's 400 used nothing, but the one before it may have used
    all of it."""
    harness = kit.build(doc=kit.document(limits=TPM))
    replies: list[Any] = [
        kit.reply(body=first) if isinstance(first, UpstreamBroken) else first,
        _refusal(kit, 400),
    ]
    harness.upstream.handler = lambda url, body: replies.pop(0)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 400
    left = 10_000 - _estimate(kit)
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(left)


async def test_a_lone_refusal_still_gives_its_estimate_back(kit: Any) -> None:
    harness = kit.build(doc=kit.document(limits=TPM))
    harness.upstream.handler = lambda url, body: _refusal(kit, 400)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 400
    assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"


async def test_a_replicas_429_judges_nothing(kit: Any) -> None:
    """A 429 says the replica is at capacity, nothing of its health: a
    sidecar's 429 must not heal a replica on its trial after an ejection (nor
    reset its failures), as a success would."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: (
        _refusal(kit, 429, "1") if "r1" in url else kit.completion()
    )
    trial = _replica(harness, "http://r1")
    trial.failures, trial.ejections_in_row = 1, 2
    async with harness.client() as client:
        for _ in range(2):
            answer = await client.post("/v1/chat/completions", json=kit.chat)
            assert answer.status_code == 200
    assert (trial.failures, trial.ejections_in_row, trial.in_flight) == (1, 2, 0)


FLAT_400 = {
    "object": "error",
    "message": "This model's maximum context length is 2048 tokens.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


@pytest.mark.parametrize(
    ("status", "said", "expected"),
    [
        (400, FLAT_400, (FLAT_400["message"], "BadRequestError", 400)),
        (404, {"detail": "Not Found"}, ("Not Found", None, "model_not_found")),
        (400, {"message": "bad"}, ("bad", None, None)),
        (429, {"error": "slow down"}, ("slow down", None, "rate_limit_exceeded")),
    ],
    ids=["vLLM before 0.10", "FastAPI's detail", "a sidecar's message", "error"],
)
async def test_a_json_refusal_with_its_message_on_top_keeps_it(
    kit: Any,
    status: int,
    said: dict[str, Any],
    expected: tuple[str, str | None, Any],
) -> None:
    """Old vLLM, FastAPI and sidecars say why at the top of their JSON: REST's
    client gets that in OpenAI's shape, with vLLM's own type and code, and
    every other door the same message."""
    harness = kit.build(replicas=("http://r1",))
    harness.upstream.handler = lambda url, body: kit.reply(status, orjson.dumps(said))
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    message, kind, code = expected
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["message"] == message
    assert error["code"] == code
    if kind is not None:
        assert error["type"] == kind
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    for door in (Door.GRPC, Door.GRAPHQL):
        with pytest.raises(GatewayError) as refused:
            await ask(harness.deps.proxy, CHAT, principal, dict(kit.chat), "r", door)
        assert (refused.value.status, refused.value.message) == (status, message)


async def test_a_json_refusal_without_a_message_is_quoted(kit: Any) -> None:
    harness = kit.build(replicas=("http://r1",))
    said = orjson.dumps({"detail": [{"loc": ["body"], "msg": "field required"}]})
    harness.upstream.handler = lambda url, body: kit.reply(422, said)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    error = answer.json()["error"]
    assert error["message"].startswith("The model refused with status 422: ")
    assert "field required" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "failure",
    [UpstreamBroken("the response broke off"), UpstreamTimeout("no next piece")],
    ids=["broken off", "timed out"],
)
@pytest.mark.parametrize("status", [503, 429])
async def test_a_refusal_whose_body_cannot_be_read_is_still_a_refusal(
    kit: Any, status: int, failure: Exception
) -> None:
    """The status says the replica did no work; its body only says why. One
    that broke off was taken for a drop: a 502, the estimate charged, the one
    retry after a drop used up."""
    harness = kit.build(doc=kit.document(limits=TPM), replicas=THREE)
    said = {"error": {"message": "The replica said no.", "type": "x"}}
    replies = [
        kit.reply(status, failure, retry_after="3"),
        kit.reply(status, failure, retry_after="4"),
        kit.reply(status, orjson.dumps(said), retry_after="9"),
    ]
    harness.upstream.handler = lambda url, body: replies.pop(0)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert len(harness.upstream.calls) == 3
    assert answer.status_code == status
    code = "rate_limit_exceeded" if status == 429 else "model_not_ready"
    assert answer.json()["error"]["code"] == code
    assert answer.headers["retry-after"] == "3"
    assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"
    first = harness.upstream.calls[0][0][:9]
    assert _backend_errors(harness, first, "protocol") == (1 if status == 503 else None)
    assert _backend_errors(harness, first, "timeout") is None


@pytest.mark.parametrize(
    "failure",
    [UpstreamBroken("the response broke off"), UpstreamTimeout("no next piece")],
    ids=["broken off", "timed out"],
)
@pytest.mark.parametrize(
    ("status", "expected", "kind", "code"),
    [
        (400, 400, "invalid_request_error", None),
        (404, 404, "invalid_request_error", "model_not_found"),
        (500, 502, "server_error", "backend_error"),
    ],
)
async def test_an_error_whose_body_cannot_be_read_keeps_its_status(
    kit: Any,
    status: int,
    expected: int,
    kind: str,
    code: str | None,
    failure: Exception,
) -> None:
    """The caller's error (a 4xx) or the server's (a 5xx) is what its status
    says, body or not: answered as such, in OpenAI's shape, with nothing
    charged, and not sent to another replica (as for one whose body came
    whole)."""
    harness = kit.build(doc=kit.document(limits=TPM))
    harness.upstream.handler = lambda url, body: kit.reply(status, failure)
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert len(harness.upstream.calls) == 1
    assert answer.status_code == expected
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert f"status {status}" in error["message"]
    assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"
    assert kit.counted(harness, str(expected)) == 1


class _Stalled:
    """A refusal whose headers came and whose body never does: each read
    takes all the time it is given (on the harness's clock), then times out."""

    content_type = "application/json"
    retry_after = None

    def __init__(self, status: int, clock: Any) -> None:
        self.status = status
        self.clock = clock
        self.given: list[float | None] = []

    async def read(self, timeout_s: float | None = None) -> bytes:
        self.given.append(timeout_s)
        self.clock.now += timeout_s or 0.0
        raise UpstreamTimeout("no next piece")

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        for _ in ():  # an async generator that never yields: no body comes
            yield b""
        raise UpstreamTimeout("no next piece")

    def lift(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("status", [503, 429])
async def test_a_refusal_whose_body_stalls_leaves_time_for_another_replica(
    kit: Any, status: int
) -> None:
    """An error's body is read for half the floor (1 s) at most, not for what
    is left of the request's time: a 429 or 503 whose body never came ate the
    whole read timeout, and no other replica was tried."""
    harness = kit.build()
    stalled = _Stalled(status, harness.clock)
    harness.upstream.handler = lambda url, body: (
        stalled if len(harness.upstream.calls) == 1 else kit.completion()
    )
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 200
    assert stalled.given == [1.0]
    assert harness.upstream.timeouts == [600.0, 599.0]


def _events(*payloads: Any) -> list[bytes]:
    """A replica's SSE events for `payloads`, then `[DONE]`."""
    return [b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads] + [
        b"data: [DONE]\n\n"
    ]


CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
STREAM = {"stream": True}


def _sample(harness: Any, name: str, **labels: str) -> float | None:
    sample = harness.deps.metrics.registry.get_sample_value
    return sample(name, labels)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "broken",
    [
        [UpstreamBroken("the response broke off")],
        [_events(CHUNK)[0][:12], UpstreamBroken("the response broke off")],
        [_events(USAGE)[0], UpstreamBroken("the response broke off")],
    ],
    ids=["before any byte", "mid-event", "after a usage chunk not relayed"],
)
async def test_a_stream_that_breaks_before_its_first_event_is_tried_again(
    kit: Any, broken: list[Any]
) -> None:
    """A replica that answers 200 and dies before the first event it would
    relay (killed during prefill, its connection reset) answered nothing the
    client saw: as for a whole answer that broke off, another replica answers
    it, and the client gets that one's stream whole with its 200, not a 200
    and an error event. The replica that broke is judged; the key pays for
    the tokens the answer reports, once."""
    harness = kit.build(doc=kit.document(limits=TPM))
    first = kit.reply(parts=broken, content_type="text/event-stream")
    parts = _events(CHUNK, CHUNK, USAGE)
    # The answer cut across network chunks: nothing read twice, nor lost.
    split = [parts[0][:7], parts[0][7:] + parts[1][:9], *[parts[1][9:], *parts[2:]]]
    second = kit.reply(parts=split, content_type="text/event-stream")

    harness.upstream.handler = lambda url, body: (
        first if len(harness.upstream.calls) == 1 else second
    )
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
        assert answer.status_code == 200
        assert answer.content == parts[0] + parts[1] + parts[3]  # no usage asked
        assert len(harness.upstream.calls) == 2
        assert first.closed
        late = harness.upstream.calls[0][0][:9]
        assert _backend_errors(harness, late, "protocol") == 1
        assert _replica(harness, late).failures == 1
        replicas = harness.deps.catalog.all_replicas().values()
        assert all(r.in_flight == 0 for r in replicas)
        assert kit.counted(harness, "200") == 1
        # Charged once, what the answer reports (the 400 after gives its back).
        harness.upstream.handler = lambda url, body: _refusal(kit, 400)
        after = await client.post("/v1/chat/completions", json=kit.chat)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 5)
    tokens = "citadel_gateway_tokens_total"
    labels = {"model": "smollm2", "key": "alice"}
    assert _sample(harness, tokens, kind="completion", **labels) == 2
    ttft = "citadel_gateway_time_to_first_token_seconds_count"
    assert _sample(harness, ttft, model="smollm2") == 1


async def test_a_stream_broken_before_its_first_event_everywhere_is_a_502(
    kit: Any,
) -> None:
    """No retry left: the client gets the 502 a whole answer gets, in
    OpenAI's shape (on gRPC and GraphQL that error), not a 200 and an error
    event; the estimate stays charged, as the replicas may have generated
    all of it, and only two replicas are tried (`_DROPS_RETRIED`)."""
    harness = kit.build(doc=kit.document(limits=TPM), replicas=THREE, retries=2)
    replies: list[Any] = []

    def broken(url: str, body: Any) -> Any:
        reply = kit.reply(parts=[UpstreamBroken("the response broke off at 10.0.0.7")])
        replies.append(reply)
        return reply

    harness.upstream.handler = broken
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
    assert answer.status_code == 502
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "backend_error")
    assert "broke off" in error["message"] and "10.0.0.7" not in answer.text
    assert len(harness.upstream.calls) == 2
    assert all(reply.closed for reply in replies)
    left = 10_000 - estimate_tokens({**kit.chat, **STREAM}, CHAT, 256)
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert kit.counted(harness, "502") == 1
    assert kit.counted(harness, "200") is None
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    body = {**kit.chat, **STREAM}
    for door in (Door.GRPC, Door.GRAPHQL):
        with pytest.raises(GatewayError) as failed:
            await ask(harness.deps.proxy, CHAT, principal, body, "r", door)
        assert (failed.value.status, failed.value.code) == (502, "backend_error")
        assert kit.counted(harness, "502", door=door.value) == 1


async def test_a_stream_that_breaks_after_its_first_event_ends_with_an_error(
    kit: Any,
) -> None:
    """Once an event went out the status is the client's: the stream is not
    tried again (the client would get the answer's start twice), and ends
    with an error event after its 200."""
    harness = kit.build()
    reply = kit.reply(parts=[_events(CHUNK)[0], UpstreamBroken("reset")])
    harness.upstream.handler = lambda url, body: reply
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
    assert answer.status_code == 200
    first, broke, _ = answer.content.split(b"\n\n")
    assert first + b"\n\n" == _events(CHUNK)[0]
    assert orjson.loads(broke[6:])["error"]["code"] == "backend_error"
    assert len(harness.upstream.calls) == 1
    url = harness.upstream.calls[0][0][:9]
    assert _backend_errors(harness, url, "protocol") == 1
    stream_errors = "citadel_gateway_stream_errors_total"
    labels = {"api": "chat", "model": "smollm2", "code": "stream_broken"}
    assert _sample(harness, stream_errors, **labels) == 1


async def test_a_replicas_own_error_event_first_is_relayed_not_tried_again(
    kit: Any,
) -> None:
    """vLLM's error event (its generation failed) is the replica's answer: it
    is relayed after the 200, as it always was."""
    harness = kit.build()
    said = {"error": {"message": "engine died", "type": "InternalServerError"}}
    harness.upstream.handler = lambda url, body: kit.reply(parts=_events(said))
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
    assert answer.status_code == 200
    assert answer.content == b"".join(_events(said))
    assert len(harness.upstream.calls) == 1


class _Silent:
    """A stream whose 200 came and whose first event never does: it waits
    until it is cancelled, or as the upstream client does, until the bound
    `chunks` was given has passed."""

    status = 200
    content_type = "text/event-stream"
    retry_after = None

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.closed = False

    async def read(self, timeout_s: float | None = None) -> bytes:
        raise AssertionError("a stream's body is relayed, not read whole")

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        self.waiting.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.Event().wait()
        except TimeoutError:
            raise UpstreamTimeout(f"no answer in {timeout_s} s") from None
        yield b""  # never reached

    def lift(self) -> None:
        raise AssertionError("no first event came: nothing to lift the bound for")

    def close(self) -> None:
        self.closed = True


async def test_a_streams_first_event_is_waited_for_within_the_deadline(
    kit: Any,
) -> None:
    """A replica that answers 200 and then says nothing is bounded by the
    request's time, as a whole answer's body is: a 504 once it is spent,
    the replica's failure (the first try had all of it), not a 200 held
    until the read timeout and then an error event."""
    harness = kit.build(replicas=("http://r1",))
    options = ProxyOptions(answer_within_s=0.2, least_try_s=0.1, connect_within_s=0.1)
    proxy = _on_real_clock(harness, options)
    silent = _Silent()
    harness.upstream.handler = lambda url, body: silent
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, **STREAM})
    with pytest.raises(BackendTimeout):
        await asyncio.wait_for(proxy.handle(CHAT, principal, raw, "r-1"), 5)
    assert silent.closed
    state = _replica(harness, "http://r1")
    assert (state.failures, state.in_flight) == (1, 0)
    assert _backend_errors(harness, "http://r1", "timeout") == 1


async def test_a_streams_first_output_is_awaited_on_the_replys_own_reads(
    kit: Any,
) -> None:
    """What is left of the request's time bounds the reply's reads until the
    first output came (`Reply.chunks`), as the upstream client bounds each
    read anyway, and the bound is lifted before the relay reads on: a timer
    of the proxy's own around the wait cost each streamed request 11 us of
    CPU, a sixth of the proxy's."""
    harness = kit.build()
    seen: list[Any] = []

    class Bounded(kit.reply):  # type: ignore[misc]
        async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
            seen.append(timeout_s)
            for part in self.parts:
                seen.append("piece")
                yield part

        def lift(self) -> None:
            seen.append("lifted")

    parts = _events(USAGE, CHUNK)  # the usage chunk is not relayed: no output

    def handler(url: str, body: Any) -> Any:
        harness.clock.now += 100  # the headers took 100 s of the 600
        return Bounded(parts=parts, content_type="text/event-stream")

    harness.upstream.handler = handler
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
    assert answer.status_code == 200
    assert answer.content == parts[1] + parts[2]
    assert seen == [500.0, "piece", "piece", "lifted", "piece"]


async def test_a_retrys_stream_cut_short_by_the_deadline_judges_no_replica(
    kit: Any,
) -> None:
    """As for a whole answer: a retry that had only what the drop before it
    left (100 s of 600 s) and saw no first event in it ran out of the
    gateway's time, not its own."""
    harness = kit.build()

    class Stalled(kit.reply):  # type: ignore[misc]
        async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
            for _ in ():  # an async generator that never yields
                yield b""
            raise UpstreamTimeout("no first event")

    def handler(url: str, body: Any) -> Any:
        if len(harness.upstream.calls) == 1:
            harness.clock.now += 500
            return UpstreamDropped("closed")
        return Stalled(content_type="text/event-stream")

    harness.upstream.handler = handler
    for url in ("http://r1", "http://r2"):
        _replica(harness, url).failures = 2  # one more failure ejects either
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json={**kit.chat, **STREAM})
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "backend_timeout"
    first, second = (call[0][:9] for call in harness.upstream.calls)
    assert _replica(harness, first).ejections_in_row == 1  # it dropped it
    late = _replica(harness, second)
    assert (late.failures, late.ejections_in_row, late.in_flight) == (2, 0, 0)
    assert _backend_errors(harness, second, "timeout") is None


async def test_a_client_gone_before_the_first_event_frees_the_replica(
    kit: Any,
) -> None:
    """A cancel (a client that left, a gRPC deadline) while the gateway waits
    for the first event ends the request as one cancelled while it waited
    for its answer: the replica freed and its connection closed, judged on
    nothing, the request counted once (499)."""
    harness = kit.build(replicas=("http://r1",))
    silent = _Silent()
    harness.upstream.handler = lambda url, body: silent
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, **STREAM})
    handling = asyncio.create_task(harness.deps.proxy.handle(CHAT, principal, raw, "r"))
    await asyncio.wait_for(silent.waiting.wait(), 5)
    handling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handling
    assert silent.closed
    state = _replica(harness, "http://r1")
    assert (state.failures, state.in_flight) == (0, 0)
    assert _backend_errors(harness, "http://r1", "timeout") is None
    assert kit.counted(harness, "499") == 1
    assert kit.counted(harness, "200") is None
