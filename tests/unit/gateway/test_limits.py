"""Token-bucket arithmetic, token estimates and the limiter (time injected)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from citadel.gateway.errors import QuotaExceeded, RateLimited
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import KeyRecord, Principal, hash_key
from citadel.gateway.services.buckets import (
    Bucket,
    InProcessBuckets,
    StoreUnavailable,
    Take,
    format_reset,
    refill,
)
from citadel.gateway.services.limits import MAX_ESTIMATE, Limiter, estimate_tokens
from citadel.gateway.services.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ApiCall,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 31, 23, 59, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def route(**limits: int) -> ModelRoute:
    return ModelRoute.model_validate(
        {
            "name": "m",
            "namespace": "n",
            "servedName": "m",
            "service": "m",
            "limits": limits,
        }
    )


def principal(**fields: object) -> Principal:
    return Principal(KeyRecord(name="k", hash=hash_key("x"), **fields))  # type: ignore[arg-type]


def test_refill_is_linear_and_capped() -> None:
    b = Bucket("b", capacity=60, rate=1, ttl_s=120)
    assert refill(0, 0, 30, b) == 30
    assert refill(50, 0, 30, b) == 60
    assert refill(10, 5, 4, b) == 10  # a clock that steps back adds nothing


async def test_take_is_all_or_nothing() -> None:
    store = InProcessBuckets()
    small, big = Bucket("s", 1, 1 / 60, 120), Bucket("b", 100, 1, 120)
    first = await store.take([Take(small, 1, 1), Take(big, 10, 10)], 0)
    assert all(lv.ok for lv in first)
    second = await store.take([Take(small, 1, 1), Take(big, 10, 10)], 0)
    assert not any(lv.ok for lv in second)
    assert second[0].wait_s == pytest.approx(60)
    # The refused take left the big bucket alone.
    assert second[1].level == 90


async def test_a_request_bigger_than_the_bucket_needs_only_a_full_bucket() -> None:
    store = InProcessBuckets()
    b = Bucket("t", 100, 100 / 60, 120)
    assert (await store.take([Take(b, 500, 100)], 0))[0].ok
    refused = (await store.take([Take(b, 1, 1)], 0))[0]
    assert not refused.ok and refused.level == -400
    assert refused.wait_s == pytest.approx(401 * 60 / 100)


async def test_expired_buckets_start_full() -> None:
    store = InProcessBuckets()
    quota = Bucket("q", 10, 0, ttl_s=5)
    await store.take([Take(quota, 10, 1)], 0)
    assert not (await store.take([Take(quota, 1, 1)], 1))[0].ok
    assert (await store.take([Take(quota, 1, 1)], 6))[0].ok


async def test_a_debt_is_waited_out_not_forgotten_when_the_ttl_ends() -> None:
    store = InProcessBuckets()
    b = Bucket("t", 100, 100 / 60, 120)
    assert (await store.take([Take(b, 1000, 100)], 0))[0].ok  # 900 in debt
    refused = (await store.take([Take(b, 1, 1)], 130))[0]  # past the 120 s TTL
    assert not refused.ok and refused.level == pytest.approx(-900 + 130 * 100 / 60)
    assert (await store.take([Take(b, 1, 1)], 601))[0].ok  # refilled by then


def test_estimate_tokens() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(chat, CHAT, 256) == 50 + 102  # "user" and separators
    assert estimate_tokens({"prompt": "abcd", "n": 2}, COMPLETIONS, 10) == 1 + 20
    assert estimate_tokens({"input": "x" * 8}, EMBEDDINGS, 256) == 2


@pytest.mark.parametrize(
    ("body", "call", "tokens"),
    [
        # 8 prompts of 1,000 tokens, each with its reply of 100.
        (
            {"prompt": ["x" * 4000] * 8, "max_tokens": 100},
            COMPLETIONS,
            8 * 1000 + 8 * 100,
        ),
        # Token ids: one token each, one prompt.
        ({"prompt": list(range(4000)), "max_tokens": 100}, COMPLETIONS, 4000 + 100),
        (
            {"prompt": [[1] * 300, [2] * 500], "max_tokens": 10},
            COMPLETIONS,
            800 + 2 * 10,
        ),
        # Each prompt's reply for each choice; best_of is generated in full.
        (
            {"prompt": ["abcd", "efgh"], "n": 3, "max_tokens": 10},
            COMPLETIONS,
            2 + 2 * 3 * 10,
        ),
        (
            {"prompt": "abcd", "n": 2, "best_of": 5, "max_tokens": 10},
            COMPLETIONS,
            1 + 5 * 10,
        ),
        (
            {"prompt": "abcd", "n": 3, "best_of": 2, "max_tokens": 10},
            COMPLETIONS,
            1 + 3 * 10,
        ),
        # Shapes the backend refuses still count each prompt as its own shape,
        # and a deep one without recursing: a list is its length in ids.
        (
            {"prompt": ["abcd", [1, 2, 3], 7], "max_tokens": 10},
            COMPLETIONS,
            1 + 3 + 1 + 3 * 10,
        ),
        ({"prompt": [[[[1] * 5]], [[2], [3]]], "max_tokens": 1}, COMPLETIONS, 3 + 2),
        # Embeddings: every input, no reply.
        ({"input": ["x" * 4000] * 64}, EMBEDDINGS, 64 * 1000),
        ({"input": [list(range(50)), list(range(30))]}, EMBEDDINGS, 80),
        ({"input": list(range(70))}, EMBEDDINGS, 70),
        # A chat's content parts count (one prompt, n replies).
        (
            {
                "messages": [{"role": "user", "content": [{"text": "x" * 394}]}],
                "max_tokens": 10,
                "n": 2,
            },
            CHAT,
            100 + 2 * 10,
        ),
        # So does text given as a plain string among them, as vLLM takes it.
        (
            {"messages": [{"role": "user", "content": ["x" * 394]}], "max_tokens": 1},
            CHAT,
            100 + 1,
        ),
    ],
)
def test_an_estimate_counts_every_prompt_and_each_reply(
    body: dict[str, Any], call: ApiCall, tokens: int
) -> None:
    """A batch estimated as its first prompt, with one reply, let a quota admit
    a request many times what it had left."""
    assert estimate_tokens(body, call, 256) == tokens


@pytest.mark.parametrize(
    ("body", "call", "tokens"),
    [
        # A chat's `input` is not an embedding's: the reply counts.
        (
            {"messages": [{"role": "user", "content": "x" * 6}], "input": "y"},
            CHAT,
            256 + 3,
        ),
        # A completion's prompt, not the messages it also carries.
        (
            {"prompt": "x" * 4000, "messages": [{"content": "y"}]},
            COMPLETIONS,
            1000 + 256,
        ),
        # An embedding's input, not a stray prompt; no reply, whatever it asks.
        ({"input": "x" * 4000, "prompt": "y", "max_tokens": 9}, EMBEDDINGS, 1000),
    ],
)
def test_an_estimate_follows_the_call_not_the_body(
    body: dict[str, Any], call: ApiCall, tokens: int
) -> None:
    """Told from the body, a chat with an `input` was an embedding (no reply)."""
    assert estimate_tokens(body, call, 256) == tokens


TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "x" * 2000, "parameters": {}},
}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [TOOL] * 50}, {}),
        ({"functions": [TOOL["function"]] * 50}, {}),
        # An agent's history: the calls it made are rendered back too.
        ({}, {"tool_calls": [{**CALL, "arguments": "y" * 2000}] * 50}),
        ({}, {"function_call": {"name": "f", "arguments": "y" * 100_000}}),
    ],
)
def test_a_chat_counts_the_tool_schemas_and_calls_in_its_prompt(
    fields: dict[str, Any], message: dict[str, Any]
) -> None:
    """vLLM renders `tools` (and the calls of earlier turns) into the prompt
    through the chat template: 50 tool schemas of 2,000 characters, some
    25,000 prompt tokens, were estimated as 3."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    bare = estimate_tokens(chat, CHAT, 256)
    turn = {"role": "assistant", "content": None, **message}
    body = {**chat, **fields, "messages": [*chat["messages"], turn]}
    size = len(orjson.dumps([*fields.values(), *message.values()]))
    added = estimate_tokens(body, CHAT, 256) - bare - 3  # "assistant" and separators
    assert 25_000 <= added <= size / 4 + 1
    # A response format is no part of the prompt: vLLM guides decoding with it.
    schema = {"type": "json_schema", "json_schema": {"schema": TOOL}}
    assert estimate_tokens({**body, "response_format": schema}, CHAT, 256) == (
        bare + 3 + added
    )


DATA = "data:image/png;base64," + "A" * 1_000_000


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": DATA}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"image_url": {"url": DATA}},  # vLLM takes it without a type
        {"type": "input_audio", "input_audio": {"data": DATA[22:], "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/cat.mp4"}},
        {"type": "file", "file": {"file_data": DATA}},
    ],
)
def test_a_chat_counts_each_media_part_at_a_fixed_size(part: dict[str, Any]) -> None:
    """Images, audio and files added nothing; nor may their payload count as
    text: 1 MB of base64 would be 250,000 tokens."""
    text = {"type": "text", "text": "x" * 400}
    chat = {"messages": [{"role": "user", "content": [text, part, part]}]}
    # 406 characters with "user" and separators, 3,000 tokens a part, a reply.
    assert estimate_tokens({**chat, "max_tokens": 1}, CHAT, 256) == 102 + 6_000 + 1


@pytest.mark.parametrize("kind", [["image_url"], {"a": "b"}, 7])
def test_a_part_of_a_type_no_string_is_counted_as_media(kind: object) -> None:
    """A list or object for `type` raised TypeError (unhashable) out of the
    estimate: a 500 for a body vLLM refuses with a 400."""

    def chat(kind: object) -> dict[str, Any]:
        part = {"type": kind, "image_url": {"url": "https://example.com/cat.png"}}
        return {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}

    image = estimate_tokens(chat("image_url"), CHAT, 256)
    assert estimate_tokens(chat(kind), CHAT, 256) == image > 3_000


@pytest.mark.parametrize(
    "message",
    [
        {"role": [0] * 10_000, "content": "x" * 400},
        {"role": {"a": "b" * 10_000}, "content": "x" * 400},
        {"role": None, "content": [{"type": "text", "text": [0] * 10_000}, "x" * 400]},
        {"role": None, "content": [{"text": {"a": "b" * 10_000}}, "x" * 400]},
    ],
)
def test_a_role_or_text_that_is_no_string_is_not_written_out(
    message: dict[str, Any],
) -> None:
    """str() of it was megabytes of text for a role of a million numbers, made
    on the event loop and counted as tokens; vLLM refuses it anyway."""
    # "None", separators, 400 characters: 102 tokens, and a reply.
    chat = {"messages": [message], "max_tokens": 1}
    assert estimate_tokens(chat, CHAT, 256) == 102 + 1


async def test_rpm_per_key_and_per_model() -> None:
    clock = Clock()
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(rpm=3)
    admitted = await limiter.admit(who, route(rpm=2), 1)
    assert admitted.headers["x-ratelimit-limit-requests"] == "2"
    await limiter.admit(who, route(rpm=2), 1)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(who, route(rpm=2), 1)
    assert info.value.scope == "requests"
    assert info.value.headers["retry-after"] == "30"
    # Another model has its own bucket; the key's own rpm=3 has one left.
    await limiter.admit(who, route(), 1)
    with pytest.raises(RateLimited):
        await limiter.admit(who, route(), 1)
    clock.now += 30
    await limiter.admit(who, route(rpm=2), 1)


async def test_tpm_is_settled_with_real_use() -> None:
    clock = Clock()
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(tpm=1000)
    admission = await limiter.admit(who, route(), 900)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "100"
    await limiter.settle(admission, 100)  # used far less than estimated
    again = await limiter.admit(who, route(), 500)
    assert again.headers["x-ratelimit-remaining-tokens"] == "400"
    await limiter.settle(again, 1400)  # used more: the bucket goes below zero
    with pytest.raises(RateLimited) as info:
        await limiter.admit(who, route(), 10)
    assert info.value.scope == "tokens"
    # The level is 400 - 900 = -500: 510 tokens at 1000/60 per second.
    assert info.value.headers["retry-after"] == "31"


async def test_daily_quota_renews_at_utc_midnight() -> None:
    clock = Clock()  # 23:59 UTC
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(daily_tokens=100)
    admission = await limiter.admit(who, route(), 80)
    await limiter.settle(admission, 120)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.admit(who, route(), 1)
    assert info.value.headers["retry-after"] == "60"
    assert info.value.status == 429 and info.value.code == "insufficient_quota"
    clock.now += 61
    await limiter.admit(who, route(), 1)


async def test_a_request_across_midnight_counts_on_the_day_it_came() -> None:
    clock = Clock()  # 23:59 UTC
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(daily_tokens=100)
    admission = await limiter.admit(who, route(), 10)
    clock.now += 61  # the reply ends after midnight, having used 90 tokens
    await limiter.settle(admission, 90)
    # The new day is whole: the 90 went to the day before.
    await limiter.settle(await limiter.admit(who, route(), 100), 100)


async def test_monthly_quota_spans_days() -> None:
    clock = Clock()
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(monthly_tokens=100)
    clock.now -= 86_400 * 5
    await limiter.settle(await limiter.admit(who, route(), 60), 60)
    clock.now += 86_400
    await limiter.settle(await limiter.admit(who, route(), 40), 40)
    with pytest.raises(QuotaExceeded):
        await limiter.admit(who, route(), 1)


async def test_a_quota_admits_only_a_request_whose_estimate_is_left() -> None:
    """A quota never refills within its period and a debt ends with it: a
    request larger than what is left would be an overshoot forgiven."""
    limiter = Limiter(InProcessBuckets(), Clock())
    who = principal(daily_tokens=10_000)
    await limiter.settle(await limiter.admit(who, route(), 9_999), 9_999)
    with pytest.raises(QuotaExceeded, match=r"has 1 tokens left.*500000"):
        await limiter.admit(who, route(), 500_000)
    await limiter.admit(who, route(), 1)


async def test_a_request_no_replica_answered_gives_its_request_back() -> None:
    limiter = Limiter(InProcessBuckets(), Clock())
    who = principal(rpm=2, tpm=1_000)
    for _ in range(5):  # a model not ready yet: retried, never served
        admission = await limiter.admit(who, route(), 100)
        await limiter.settle(admission, 0, served=False)
    admission = await limiter.admit(who, route(), 100)
    assert admission.headers["x-ratelimit-remaining-requests"] == "1"
    assert admission.headers["x-ratelimit-remaining-tokens"] == "900"


def test_an_estimate_stays_within_bounds() -> None:
    huge = {"messages": [], "max_tokens": 10**19, "n": 128}
    assert estimate_tokens(huge, CHAT, 256) == MAX_ESTIMATE


async def test_no_limits_no_buckets() -> None:
    limiter = Limiter(InProcessBuckets(), Clock())
    admission = await limiter.admit(Principal(None), route(), 10)
    assert admission.headers == {}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_format(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


class DownStore:
    async def take(self, takes: object, now: float) -> list[object]:
        raise StoreUnavailable("redis: connection refused")

    async def adjust(self, takes: object, now: float) -> None:
        raise StoreUnavailable("redis: connection refused")


async def test_an_unreachable_store_admits_unchecked() -> None:
    limiter = Limiter(DownStore(), Clock())  # type: ignore[arg-type]
    admission = await limiter.admit(principal(rpm=1), route(rpm=1), 10)
    assert admission.headers == {}
    await limiter.settle(admission, 5)


async def test_a_quota_changed_within_its_period_applies_at_once() -> None:
    """The bucket counts what is used, so the key's quota, read at each request,
    can change: a raised one unblocks the key, a lowered one keeps what was used."""
    limiter = Limiter(InProcessBuckets(), Clock())
    small = principal(daily_tokens=1_000)
    await limiter.settle(await limiter.admit(small, route(), 1_000), 1_000)
    with pytest.raises(QuotaExceeded, match="1000 tokens"):
        await limiter.admit(small, route(), 10)
    await limiter.admit(principal(daily_tokens=100_000), route(), 10)
    big = principal(monthly_tokens=1_000_000)
    await limiter.settle(await limiter.admit(big, route(), 900_000), 900_000)
    with pytest.raises(QuotaExceeded):
        await limiter.admit(principal(monthly_tokens=100_000), route(), 10)
    [standing] = await limiter.standing(principal(monthly_tokens=950_000), [route()])
    assert (standing.limit, standing.remaining) == (950_000, 50_000)


async def test_a_refusal_reports_the_bucket_that_refused() -> None:
    clock = Clock()
    limiter = Limiter(InProcessBuckets(), clock)
    who = principal(rpm=100)
    a = route(rpm=10)
    b = route().model_copy(update={"served_name": "b", "name": "b"})
    for _ in range(10):
        await limiter.admit(who, a, 1)
    for _ in range(85):
        await limiter.admit(who, b, 1)
    clock.now += 5.4  # model a's bucket refills to 0.9, the key's to 14
    for _ in range(10):
        await limiter.admit(who, b, 1)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(who, a, 1)
    headers = refused.value.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"


def _tokens(headers: dict[str, str]) -> tuple[str, str, str]:
    return (
        headers["x-ratelimit-limit-tokens"],
        headers["x-ratelimit-remaining-tokens"],
        headers["x-ratelimit-reset-tokens"],
    )


async def test_token_headers_show_the_tightest_budget_a_quota_too() -> None:
    """A quota is a token budget: when it leaves less than the tokens per
    minute, the headers show it (its limit, what is left, the end of its
    period), as they do for a key with a quota only."""
    limiter = Limiter(InProcessBuckets(), Clock())  # 23:59 UTC
    tight = principal(tpm=100_000, daily_tokens=1_000)
    assert _tokens((await limiter.admit(tight, route(), 600)).headers) == (
        "1000",
        "400",
        "1m0s",
    )
    limiter = Limiter(InProcessBuckets(), Clock())
    roomy = principal(tpm=1_000, daily_tokens=100_000)
    assert _tokens((await limiter.admit(roomy, route(), 600)).headers) == (
        "1000",
        "400",
        "36s",
    )
    limiter = Limiter(InProcessBuckets(), Clock())
    monthly = principal(daily_tokens=100_000, monthly_tokens=5_000)
    assert _tokens((await limiter.admit(monthly, route(), 600)).headers) == (
        "5000",
        "4400",
        "1m0s",  # 23:59 on the 31st of March: the month ends with the day
    )
    # The fewest tokens left, not the smallest share of a limit: 400 of the
    # minute's 1,000 can be sent now, not 30% of a month's 1,000,000.
    clock = Clock()
    clock.now -= 10 * 86_400
    limiter = Limiter(InProcessBuckets(), clock)
    month = principal(tpm=1_000, monthly_tokens=1_000_000)
    await limiter.settle(await limiter.admit(month, route(), 1), 700_000)
    clock.now += 86_400  # the minute's debt is long paid
    assert _tokens((await limiter.admit(month, route(), 600)).headers) == (
        "1000",
        "400",
        "36s",
    )


async def test_a_quota_refusal_carries_the_quotas_headers() -> None:
    """Not those of the tokens per minute, which did not refuse and had room."""
    limiter = Limiter(InProcessBuckets(), Clock())  # 23:59 UTC
    who = principal(tpm=100_000, daily_tokens=1_000)
    await limiter.settle(await limiter.admit(who, route(), 600), 600)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.admit(who, route(), 500)
    headers = info.value.headers
    assert _tokens(headers) == ("1000", "400", "1m0s")
    assert headers["retry-after"] == "60"
    # Refused by the tokens per minute, the headers are its own.
    limiter = Limiter(InProcessBuckets(), Clock())
    who = principal(tpm=1_000, daily_tokens=100_000)
    await limiter.admit(who, route(), 900)
    with pytest.raises(RateLimited) as minute:
        await limiter.admit(who, route(), 500)
    assert _tokens(minute.value.headers) == ("1000", "100", "54s")
    assert minute.value.headers["retry-after"] == "24"


async def test_live_buckets_past_the_bound_are_not_swept_at_each_store() -> None:
    store = InProcessBuckets(max_buckets=10)
    sweeps = 0
    state = store._state

    class Counting(dict[str, tuple[float, float, float]]):
        def items(self) -> Any:
            nonlocal sweeps
            sweeps += 1
            return super().items()

    store._state = Counting(state)
    for i in range(100):  # all live: nothing to drop
        bucket = Bucket(f"b{i}", 10, 0.0, 3600)
        await store.take([Take(bucket, 1, 1)], 0.0)
        if not isinstance(store._state, Counting):
            store._state = Counting(store._state)
    assert len(store._state) == 100
    assert sweeps <= 4  # at 11, 23, 47, 95 kept
