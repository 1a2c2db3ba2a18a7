"""Limits per key and per model: requests and tokens per minute, token quotas per
day and month.

Which buckets a request draws from:
- the key's own `rpm`/`tpm` (over all models) and its daily and monthly quotas;
- the model's `limits` from the routing document, a per-key default: each key gets
  its own `rpm`/`tpm` bucket for that model.

Tokens are estimated before the request (each prompt's characters / 4, with a
chat's tool schemas and calls as their JSON's characters / 4 and a fixed number
for each image, audio or file, plus `max_tokens` for each prompt and choice) and
corrected once the reply's usage is known. When the bucket store is unreachable
(Redis down) requests are admitted unchecked and the error logged: an outage of
the limit store does not stop serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from citadel.gateway.errors import QuotaExceeded, RateLimited
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.buckets import (
    Bucket,
    BucketStore,
    Level,
    StoreUnavailable,
    Take,
    format_reset,
    reset_time,
)
from citadel.gateway.services.prefix import TEXT_PARTS, prompt_text
from citadel.gateway.services.requests import ApiCall, ApiKind, prompt_body

MINUTE = 60.0
MAX_ESTIMATE = 10**9
"""The most tokens one request is estimated at: beyond any model's context (the
model refuses a larger `max_tokens`, and the estimate is then given back), and
small enough for the bucket arithmetic in Redis's Lua, which a `max_tokens` of
10^19 broke."""

MEDIA_PART_TOKENS = 3_000
"""What each image, audio, video or file part of a chat is estimated at,
whatever its size: what common vision models in vLLM make of a photo at their
default resolution, rounded up (a 1920x1080 one is about 2,700 tokens in
Qwen2-VL, one per 28x28 pixels; LLaVA-NeXT's largest grid is 2,928, LLaVA-1.5's
one image 576). The part's payload (a `data:` URL, base64 audio) is never
counted as text: 1 MB of it would be 250,000 tokens. The reply's usage corrects
the estimate either way."""

log = logging.getLogger(__name__)


def estimate_tokens(
    body: Mapping[str, Any],
    call: ApiCall,
    default_max_tokens: int,
    prompt: Mapping[str, Any] | None = None,
) -> int:
    """A cautious guess of a request's tokens, before it is sent.

    What counts follows the endpoint called (`call`), never the fields the body
    happens to carry: a chat's `messages`, a completion's `prompt`, an
    embedding's `input`, a Responses request's `instructions` and `input`.
    Every prompt counts: its characters / 4, or for a
    prompt given as token ids one token each; a chat is one prompt, its
    messages as `prompt_text` joins them, `MEDIA_PART_TOKENS` for each of
    their image, audio, video or file parts (not their payload's characters),
    and its `tools` (or `functions`) and the messages' `tool_calls` (or
    `function_call`) as their JSON's characters / 4; not `response_format`.
    A chat or completion adds its reply
    (`max_completion_tokens`, else `max_tokens`, else `default_max_tokens`) for
    each prompt and each sequence generated for it: `n`, or `best_of` when
    larger, as every candidate is generated (and billed by OpenAI) though only
    `n` come back; an embedding generates nothing. A Responses request counts
    as the chat it stands for (`prompt_body`: `instructions` and the `input`
    items as messages, its `tools`), with one reply of `max_output_tokens`,
    else `default_max_tokens`. `body` is one `parse_body` checked: it nests no
    deeper than JSON is written; `prompt` is its `prompt_body` where the caller
    made it already.
    """
    if call.kind in (ApiKind.CHAT, ApiKind.RESPONSES):
        chat = prompt if prompt is not None else prompt_body(body, call)
        tokens, prompts = _chat_tokens(chat), 1
    else:
        tokens, prompts = _prompt_tokens(body.get(call.prompt_field))
    if call.kind is not ApiKind.EMBEDDINGS:
        if call.kind is ApiKind.RESPONSES:
            reply, sequences = body.get("max_output_tokens"), 1  # it has no `n`
        else:
            reply = body.get("max_completion_tokens") or body.get("max_tokens")
            sequences = _sequences(body)
        if not isinstance(reply, int) or reply < 1:
            reply = default_max_tokens
        tokens += reply * prompts * sequences
    return min(MAX_ESTIMATE, max(1, tokens))


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _chat_tokens(body: Mapping[str, Any]) -> int:
    """The tokens of a chat's prompt: its messages' text, as `prompt_text`
    joins it, `MEDIA_PART_TOKENS` for each of their media parts, and the JSON
    of the tool schemas and calls that the chat template renders beside
    them."""
    # vLLM hands `tools` to the chat template, which writes them into the
    # prompt (often the largest part of an agent's), and so are the calls of
    # earlier turns. `functions`, OpenAI's older name, vLLM does not read:
    # counted all the same, as OpenAI renders them; an estimate too high is
    # given back once the reply's usage is known. `response_format` is not
    # counted: vLLM compiles its schema into a grammar that guides decoding,
    # outside the prompt and its usage, so it would stay charged on every
    # reply that reports no usage.
    rendered = [body.get("tools"), body.get("functions")]
    media = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                rendered += (message.get("tool_calls"), message.get("function_call"))
                media += _media_parts(message.get("content"))
    structured = [value for value in rendered if value is not None]
    tokens = _text_tokens(prompt_text(body)) + media * MEDIA_PART_TOKENS
    if structured:
        # One serialisation of them all, in C, which cannot fail: they nest
        # no deeper than the body, which `parse_body` wrote.
        tokens += math.ceil(len(orjson.dumps(structured)) / 4)
    return tokens


def _media_parts(content: object) -> int:
    """How many parts of a message's content are media: any part object that
    is not text (vLLM takes an image without its `type`, so none is needed; a
    `type` that is no string, which vLLM refuses, is no text either)."""
    if not isinstance(content, list):
        return 0
    return sum(
        1
        for part in content
        if isinstance(part, Mapping)
        and "text" not in part
        and not (isinstance(kind := part.get("type"), str) and kind in TEXT_PARTS)
    )


def _prompt_tokens(value: object) -> tuple[int, int]:
    """The tokens of a completion's `prompt` or an embedding's `input`, and how
    many prompts it holds: a string, token ids, or an array of either (a batch,
    each prompt generated for or embedded on its own)."""
    if isinstance(value, str):
        return _text_tokens(value), 1
    if isinstance(value, list) and value:
        # Token ids are integers throughout (the backend refuses a mix), so
        # the first tells, without a pass over a prompt of thousands.
        if isinstance(value[0], int):
            return len(value), 1
        return sum(_one_prompt(item) for item in value), len(value)
    return 0, 1


def _one_prompt(item: object) -> int:
    """The tokens of one prompt of a batch."""
    if isinstance(item, str):
        return _text_tokens(item)
    if isinstance(item, list):  # token ids
        return len(item)
    # A token id among strings, or a shape the backend will refuse: one token,
    # not its text (str() of a deeply nested value would recurse past the limit).
    return 1


def _sequences(body: Mapping[str, Any]) -> int:
    """How many replies are generated for each prompt."""
    count = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if isinstance(value, int) and value > count:
            count = value
    return count


QUOTA_SCALE = 1e12
"""What every quota bucket holds when nothing is used: its level is this minus
the tokens used, so the key's quota, read at each request, can change within a
period (a bucket holding what is left kept the old quota until the period ended,
and a lowered one forgot what was used). Lua keeps integers exact to 14 digits."""


@dataclass(frozen=True)
class _Check:
    take: Take
    scope: str  # "requests", "tokens" or "quota"
    limit: int
    window: str = "minute"  # or "day", "month" for quotas
    model: str | None = None  # None: the key's own bucket, over all models

    def left(self, level: float) -> float:
        """What is left of `limit` when the bucket is at `level`."""
        return level - (self.take.bucket.capacity - self.limit)


@dataclass
class Admission:
    """A request let through: the headers to return, and what to correct later."""

    estimate: int
    headers: dict[str, str] = field(default_factory=dict)
    checks: tuple[_Check, ...] = ()
    """The buckets it was checked against, and their levels after the take."""
    levels: tuple[Level, ...] = ()

    def headers_after(self, taken: Mapping[str, float]) -> dict[str, str]:
        """The x-ratelimit-* headers once `taken` (from `Limiter.settle`) is
        applied to the levels this admission left."""
        if not taken:
            return self.headers
        levels = [
            replace(level, level=level.level - taken.get(check.take.bucket.key, 0))
            for check, level in zip(self.checks, self.levels, strict=True)
        ]
        return _headers(list(self.checks), levels)

    def settles_in_store(self, served: bool) -> bool:
        """Whether `Limiter.settle` may write to the store (and wait on it):
        to correct tokens, or to give back a request that was not `served`."""
        return bool(self.token_takes) or (not served and bool(self.request_takes))

    @property
    def token_takes(self) -> tuple[Take, ...]:
        """What it took from token buckets (per minute and quotas)."""
        return tuple(c.take for c in self.checks if c.scope != "requests")

    @property
    def request_takes(self) -> tuple[Take, ...]:
        """What it took from requests-per-minute buckets."""
        return tuple(c.take for c in self.checks if c.scope == "requests")


@dataclass(frozen=True)
class Standing:
    """Where one of a caller's buckets stands now (for the GraphQL `usage`)."""

    scope: str
    """`requests`, `tokens` or `quota`."""
    window: str
    """`minute`, `day` or `month`."""
    model: str | None
    """The served name for a per-model limit; None for the key's own."""
    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again (for a quota: the period ends)."""


class Limiter:
    """Admits requests against the buckets and settles their real token use.

    Args:
        store: where bucket levels live (in process or Redis).
        clock: wall-clock seconds (Unix time: quotas follow UTC days and months,
            and gateways sharing Redis must agree on it).
    """

    def __init__(self, store: BucketStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    async def admit(
        self, principal: Principal, route: ModelRoute, estimate: int
    ) -> Admission:
        """Takes one request and `estimate` tokens from every bucket that applies.

        Raises:
            RateLimited: a requests- or tokens-per-minute bucket is empty.
            QuotaExceeded: a daily or monthly quota is used up.
        """
        now = self._clock()
        checks = self._checks(principal, route, estimate, now)
        if not checks:
            return Admission(estimate)
        try:
            levels = await self._store.take([c.take for c in checks], now)
        except StoreUnavailable as err:
            # Fail open: an outage of the limit store must not stop serving.
            log.error("limits not checked: store unavailable", extra={"error": err})
            return Admission(estimate)
        headers = _headers(checks, levels)
        if not levels[0].ok:
            raise _refusal(checks, levels, headers, principal, route)
        return Admission(estimate, headers, tuple(checks), tuple(levels))

    async def settle(
        self, admission: Admission, used: int, *, served: bool = True
    ) -> dict[str, float]:
        """Corrects the token buckets by the real use minus the estimate.

        Args:
            admission: what `admit` took.
            used: the tokens the request used.
            served: False for a request no replica answered, which gives its
                request back too: a client retrying a model that is not ready
                yet would otherwise be rate limited once it is.

        Returns:
            What was taken from (negative: given back to) each bucket, by key;
            empty when nothing was, or the store failed. `Admission.headers_after`
            makes the headers of an error answered after it; a success needs
            none (its headers went out with the answer).
        """
        delta = used - admission.estimate
        takes = [Take(t.bucket, delta, 0) for t in admission.token_takes if delta]
        if not served:
            takes += [Take(t.bucket, -t.amount, 0) for t in admission.request_takes]
        if not takes:
            return {}
        try:
            await self._store.adjust(takes, self._clock())
        except StoreUnavailable as err:
            log.error("token use not settled: store unavailable", extra={"error": err})
            return {}
        return {t.bucket.key: t.amount for t in takes}

    async def standing(
        self, principal: Principal, routes: Iterable[ModelRoute]
    ) -> list[Standing]:
        """The caller's buckets (its own and those of `routes`), read without
        taking anything.

        Raises:
            StoreUnavailable: the bucket store cannot be reached.
        """
        now = self._clock()
        checks = {
            c.take.bucket.key: c
            for route in routes
            for c in self._checks(principal, route, 0, now)
        }
        # Amount and need 0: nothing is taken, the levels come back.
        takes = [Take(c.take.bucket, 0, 0) for c in checks.values()]
        levels = await self._store.take(takes, now) if takes else []
        return [
            Standing(
                c.scope,
                c.window,
                c.model,
                c.limit,
                max(0, math.floor(c.left(level.level))),
                reset_time(level.level, c.take.bucket),
            )
            for c, level in zip(checks.values(), levels, strict=True)
        ]

    def _checks(
        self, principal: Principal, route: ModelRoute, estimate: int, now: float
    ) -> list[_Check]:
        key = principal.key
        who = principal.name or "anonymous"
        model = route.served_name
        checks: list[_Check] = []

        def per_minute(
            scope: str, ident: str, limit: int | None, amount: int, per: str | None
        ) -> None:
            if limit is not None:
                bucket = Bucket(f"{scope}:{ident}", limit, limit / MINUTE, 2 * MINUTE)
                take = Take(bucket, amount, min(amount, limit))
                checks.append(_Check(take, scope, limit, model=per))

        by_model = f"key:{who}:model:{model}"
        per_minute("requests", f"key:{who}", key.rpm if key else None, 1, None)
        per_minute("requests", by_model, route.limits.rpm, 1, model)
        per_minute("tokens", f"key:{who}", key.tpm if key else None, estimate, None)
        per_minute("tokens", by_model, route.limits.tpm, estimate, model)
        if key is not None:
            for period, limit in (
                ("day", key.daily_tokens),
                ("month", key.monthly_tokens),
            ):
                if limit is not None:
                    stamp, left_s = _period(period, now)
                    bucket = Bucket(
                        f"quota-used:key:{who}:{stamp}", QUOTA_SCALE, 0.0, left_s
                    )
                    # The whole estimate must be left (as for the per-minute
                    # buckets): a quota never refills within its period, and a
                    # debt is forgiven when the next period's bucket starts.
                    need = min(estimate, limit) + QUOTA_SCALE - limit
                    take = Take(bucket, estimate, need)
                    checks.append(_Check(take, "quota", limit, window=period))
        return checks


def _period(period: str, now: float) -> tuple[str, float]:
    """The period's stamp (UTC) and the seconds left in it."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        stamp = start.strftime("%Y-%m-%d")
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        stamp = start.strftime("%Y-%m")
    return stamp, (end - t).total_seconds()


def _headers(checks: list[_Check], levels: list[Level]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers: for requests, of the requests-per-minute
    buckets; for tokens, of the tokens-per-minute buckets and the quotas, a
    quota's being its own numbers (its limit, what is left of it, the end of its
    period).

    Of each kind, the bucket with the fewest left is shown, the budget a client
    has; on a refusal, of those that refused, the one waited for longest, as
    `Retry-After` is.
    """
    headers: dict[str, str] = {}
    refused = not levels[0].ok
    for name, scopes in (("requests", ("requests",)), ("tokens", ("tokens", "quota"))):
        pairs = [
            (c, lv) for c, lv in zip(checks, levels, strict=True) if c.scope in scopes
        ]
        failed = [(c, lv) for c, lv in pairs if refused and lv.level < c.take.need]
        if failed:
            check, level = max(failed, key=lambda p: p[1].wait_s)
        elif pairs:
            check, level = min(pairs, key=lambda p: p[0].left(p[1].level))
        else:
            continue
        remaining = max(0, math.floor(check.left(level.level)))
        headers[f"x-ratelimit-limit-{name}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
        headers[f"x-ratelimit-reset-{name}"] = format_reset(
            reset_time(level.level, check.take.bucket)
        )
    return headers


def _refusal(
    checks: list[_Check],
    levels: list[Level],
    headers: dict[str, str],
    principal: Principal,
    route: ModelRoute,
) -> RateLimited | QuotaExceeded:
    failed = [
        (c, lv) for c, lv in zip(checks, levels, strict=True) if lv.level < c.take.need
    ]
    check, level = max(failed, key=lambda p: p[1].wait_s)
    wait = level.wait_s
    who = f"key `{principal.name}`" if principal.name else "this gateway"
    if check.scope == "quota":
        left = max(0, math.floor(check.left(level.level)))
        state = (
            f"has {left} tokens left this period ({check.limit}), fewer than "
            f"this request may use ({int(check.take.amount)}: the prompt and "
            "max_tokens); ask for fewer, or wait until it renews"
            if left
            else f"is used up for this period ({check.limit} tokens); it renews"
        )
        error: RateLimited | QuotaExceeded = QuotaExceeded(
            f"The token quota of {who} {state} in {format_reset(wait)}.",
            retry_after_s=wait,
            headers=headers,
            scope=check.scope,
        )
    else:
        per = "requests" if check.scope == "requests" else "tokens"
        error = RateLimited(
            f"Rate limit reached for {per} per minute on {who}, model "
            f"`{route.served_name}`: limit {check.limit}. "
            f"Try again in {format_reset(wait)}.",
            retry_after_s=wait,
            headers=headers,
            scope=check.scope,
        )
    return error
