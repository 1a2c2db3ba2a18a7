"""The GraphQL schema: queries, the chat mutation and the streaming
subscription, with limits on what one document may ask.

Every operation that reaches a model runs `ProxyService.handle`, like REST and
gRPC. Validation refuses documents deeper than `MAX_DEPTH`, longer than
`MAX_TOKENS` tokens or with more than `MAX_ALIASES` aliases (the way to ask for
the same field twice), so one document cannot fan out into unbounded work;
execution refuses variables holding a list longer than `MAX_LIST_ITEMS`, before
they are coerced (`citadel.gateway.graphql.limits`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import strawberry
from graphql import GraphQLError
from starlette.requests import Request
from strawberry.extensions import MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.types import ExecutionContext, Info

from citadel.gateway.deps import ClientWatch
from citadel.gateway.errors import GatewayError, LimitStoreUnavailable
from citadel.gateway.graphql.context import GraphQLContext
from citadel.gateway.graphql.errors import reported
from citadel.gateway.graphql.limits import VariableListLimiter
from citadel.gateway.graphql.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionInput,
    Limit,
    Model,
    Usage,
)
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.buckets import StoreUnavailable
from citadel.gateway.services.requests import CHAT, Door
from citadel.gateway.services.structured import (
    Answer,
    ask,
    passed_on,
    usable_models,
)
from citadel.gateway.versioning import API_VERSION

MAX_DEPTH = 6
MAX_TOKENS = 2000
MAX_ALIASES = 4

Ctx = Info[GraphQLContext, None]
T = TypeVar("T")


async def _models(info: Ctx) -> list[Model]:
    with reported():
        ctx = info.context
        catalog = ctx.deps.catalog
        # One entry per base model the key may use by any of its names, and
        # one per adapter it may use (a model of its own).
        models: dict[str, Model] = {}
        for name, route in usable_models(catalog, ctx.principal()):
            adapter = name if route.parent_of(name) else None
            shown = adapter or route.served_name
            if shown not in models:
                replicas = len(catalog.replicas(route))
                models[shown] = Model.of(route, replicas, adapter)
        return list(models.values())


async def _usage(info: Ctx) -> Usage:
    with reported():
        ctx = info.context
        principal = ctx.principal()
        catalog = ctx.deps.catalog
        routes = {r.served_name: r for _, r in usable_models(catalog, principal)}
        try:
            standings = await ctx.deps.proxy.limiter.standing(
                principal, routes.values()
            )
        except StoreUnavailable as err:
            raise LimitStoreUnavailable("The limit store is unreachable.") from err
        key = principal.key
        return Usage(
            key=key.name if key else None,
            role=key.role.value if key else None,
            priority=key.priority.value if key else None,
            limits=[Limit.of(s) for s in standings],
        )


def _api_version() -> str:
    return API_VERSION


def _caller(ctx: GraphQLContext) -> Principal:
    """The caller of a chat operation; a refused key is counted as REST counts it.

    Over WebSocket the key is checked again here, for a key revoked since the
    socket's check as the operation started (over HTTP it was checked, and a
    refusal counted, before the operation was known).
    """
    try:
        return ctx.principal()
    except GatewayError as err:
        ctx.deps.proxy.refused(CHAT, ctx.request_id, err, Door.GRAPHQL)
        raise


def _ask(
    ctx: GraphQLContext,
    body: dict[str, Any],
    fit: Callable[[dict[str, Any]], object] | None = None,
) -> Awaitable[Answer]:
    return ask(
        ctx.deps.proxy,
        CHAT,
        _caller(ctx),
        body,
        ctx.next_request_id(),
        Door.GRAPHQL,
        ctx.session,
        fit,
        ctx.priority,
    )


async def _chat_completion(info: Ctx, input: ChatCompletionInput) -> ChatCompletion:
    with reported():
        ctx = info.context
        body = input.body(stream=False)
        # Read before the proxy counts the request: an answer that does not
        # fit the schema is counted as the 502 it ends with, not as a 200.
        read: list[ChatCompletion] = []

        def fit(payload: dict[str, Any]) -> None:
            read.append(ChatCompletion.of(payload))

        answer = await _unless_gone(ctx.request, _ask(ctx, body, fit))
        ctx.add_headers(passed_on(answer.headers))
        return read[0]


async def _unless_gone(request: object, work: Awaitable[T]) -> T:
    """`work`, cancelled if the HTTP client leaves first: uvicorn never cancels
    the app, and the replica would generate a whole answer nobody reads (the
    OpenAI client sends it again after its timeout). The proxy counts it 499.
    Over WebSocket strawberry stops an operation whose socket closes."""
    task = asyncio.ensure_future(work)
    if not isinstance(request, Request):
        return await task
    watch = ClientWatch(request.receive, task)
    try:
        return await task
    except asyncio.CancelledError:
        if not watch.gone:  # this resolver was cancelled itself
            task.cancel()
            raise
        # Nobody reads the answer; an error, not a cancel, keeps the server
        # from logging a traceback for it.
        raise GraphQLError("The client left before the answer came.") from None
    finally:
        watch.stop()


async def _chat_completion_stream(
    info: Ctx, input: ChatCompletionInput
) -> AsyncGenerator[ChatCompletionChunk, None]:
    with reported():
        ctx = info.context
        body = input.body(stream=True)
        answer = await _ask(ctx, body)
    assert answer.chunks is not None
    try:
        with reported():
            async for chunk in answer.chunks:
                try:
                    piece = ChatCompletionChunk.of(chunk)
                except GatewayError as err:
                    # Before the stream closes (and is counted): counted as
                    # the 502 the client gets, not as the replica's 200.
                    answer.unusable(err)
                    raise
                yield piece
    finally:
        await answer.chunks.aclose()


@strawberry.type
class Query:
    models: list[Model] = strawberry.field(
        resolver=_models, description="The models the caller's key may use."
    )
    # Nullable: the limit store (Redis) may be unreachable, and an error in a
    # non-null field would null all of `data`, the other fields asked with it
    # (`models`, `apiVersion`) too.
    usage: Usage | None = strawberry.field(
        resolver=_usage,
        description="The caller's key, its limits and quotas now; null with an "
        "error when the limit store cannot be reached.",
    )
    api_version: str = strawberry.field(
        resolver=_api_version, description="The API version served (`v1`)."
    )


@strawberry.type
class Mutation:
    # Nullable: a document may ask for several completions (aliases), and an
    # error in a non-null field would null all of `data`, losing the answers
    # of those that worked, and were charged for.
    chat_completion: ChatCompletion | None = strawberry.mutation(
        resolver=_chat_completion,
        description="Creates a chat completion, answered whole; null with an "
        "error when it fails.",
    )


@strawberry.type
class Subscription:
    chat_completion_stream: AsyncGenerator[ChatCompletionChunk, None] = (
        strawberry.subscription(
            resolver=_chat_completion_stream,
            description="Streams a chat completion, one chunk as each arrives.",
        )
    )


class _Schema(strawberry.Schema):
    def process_errors(
        self,
        errors: list[GraphQLError],
        execution_context: ExecutionContext | None = None,
    ) -> None:
        # Refusals (bad key, limits, validation) are the caller's business,
        # logged by the proxy already; only unexpected errors are logged here.
        unexpected = [
            e
            for e in errors
            if e.original_error is not None
            and not isinstance(e.original_error, GraphQLError | GatewayError)
            and not (e.extensions or {}).get("code")
        ]
        if unexpected:
            super().process_errors(unexpected, execution_context)


def build_schema() -> strawberry.Schema:
    """The schema with its document limits."""
    return _Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[
            lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
            lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
            lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
            VariableListLimiter,
        ],
    )
