"""The OpenAI-compatible endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from citadel.gateway.api.schemas import (
    CHAT_REQUEST,
    COMPLETION_REQUEST,
    EMBEDDING_REQUEST,
    error_responses,
    request_body,
)
from citadel.gateway.deps import (
    REQUEST_ID,
    DepsDep,
    PrincipalDep,
    RequestIdDep,
    caller,
    deps_of,
    take_request_id,
)
from citadel.gateway.errors import BodyTooLarge
from citadel.gateway.services.requests import CHAT, COMPLETIONS, EMBEDDINGS, ApiCall

router = APIRouter(prefix="/v1", tags=["openai"], responses=error_responses())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"The request body is over the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def forward(call: ApiCall, request: Request) -> Response:
    """Runs the proxy and wraps its answer in a response."""
    rid = take_request_id(request)
    deps = deps_of(request)
    principal = caller(request, deps)
    raw = await read_body(request, deps.max_body_bytes)
    session = request.headers.get(deps.session_header)
    result = await deps.proxy.handle(call, principal, raw, rid, session)
    if result.stream is not None:
        return StreamingResponse(
            result.stream, result.status, result.headers, result.media_type
        )
    return Response(result.body, result.status, result.headers, result.media_type)


# The forwarding endpoints take the bare request (see citadel.gateway.deps).
@router.post("/chat/completions", openapi_extra=request_body(CHAT_REQUEST))
async def chat_completions(request: Request) -> Response:
    """Creates a chat completion (streamed as server-sent events with `stream`)."""
    return await forward(CHAT, request)


@router.post("/completions", openapi_extra=request_body(COMPLETION_REQUEST))
async def completions(request: Request) -> Response:
    """Creates a text completion (streamed as server-sent events with `stream`)."""
    return await forward(COMPLETIONS, request)


@router.post("/embeddings", openapi_extra=request_body(EMBEDDING_REQUEST))
async def embeddings(request: Request) -> Response:
    """Creates embeddings of the input."""
    return await forward(EMBEDDINGS, request)


@router.get("/models")
async def list_models(
    response: Response, deps: DepsDep, rid: RequestIdDep, principal: PrincipalDep
) -> dict[str, object]:
    """The models the caller's key may use (served names and aliases)."""
    response.headers[REQUEST_ID] = rid
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "citadel"}
        for route in deps.catalog.routes()
        for name in route.names
        if principal.may_use(route, name)
    ]
    return {"object": "list", "data": data}
