"""The HTTP side: vLLM's OpenAI routes (chat, completions, responses), `/health`
and `/metrics` over an Engine."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator.engine import TTFT_BUCKETS_S, Engine, Sequence, output_text
from simulator.params import SimParams
from simulator.responses import (
    EventStream,
    ResponseHead,
    ResponsesError,
    new_ids,
    parse_request,
    response_object,
    usage,
)

ENGINE = web.AppKey("engine", Engine)
SERVED = web.AppKey("served", str)


def render_messages(messages: list[Any]) -> str:
    """Chat messages in a simple template, ending where the reply starts."""
    parts = []
    for message in messages:
        if isinstance(message, Mapping):
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(
                    str(p.get("text", "")) for p in content if isinstance(p, dict)
                )
            parts.append(f"<|{message.get('role')}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"


def render_prompt(body: Mapping[str, Any]) -> str:
    """The text the model would see: chat messages in a simple template, or the
    completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return render_messages(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return str(prompt or "")


def _error(
    status: int,
    message: str,
    kind: str = "BadRequestError",
    param: str | None = None,
) -> web.Response:
    error = {"message": message, "type": kind, "param": param}
    return web.json_response(
        {"error": {**error, "code": status}}, status=status, dumps=_dumps
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _read_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the error answer."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    return body


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if not isinstance(max_tokens, int):
        max_tokens = engine.params.default_max_tokens
    seq = engine.prepare(render_prompt(body), max_tokens)
    if not engine.fits(seq):
        return _error(400, "The prompt and max_tokens exceed the model's length.")
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.get("model") or request.app[SERVED],
    }
    if body.get("stream") is True:
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(request, engine, seq, base, chat, usage)
    count = await _run(engine, seq)
    text = output_text(count, 0, engine.params.chars_per_token)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    answer = {
        **base,
        "object": "chat.completion" if chat else "text_completion",
        "choices": [choice],
        "usage": _usage(seq, count),
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def _usage(seq: Sequence, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": seq.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": seq.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
    }


async def _run(engine: Engine, seq: Sequence) -> int:
    """Runs `seq` to its end; the number of tokens it made."""
    if engine.params.instant:
        engine.counters.prompt_tokens += seq.prompt_tokens
        engine.counters.generation_tokens += seq.max_tokens
        engine.counters.requests_finished += 1
        return seq.max_tokens
    engine.submit(seq)
    try:
        while await seq.tokens.get() is not None:
            pass
    finally:
        if seq.generated < seq.max_tokens:
            engine.cancel(seq)
    return seq.generated


async def _pieces(
    engine: Engine, seq: Sequence
) -> AsyncGenerator[tuple[int, int], None]:
    """Runs `seq` and yields the token ranges (start, end) a stream sends: the
    first token alone, then every `stream_every` tokens and the last; with
    `instant`, every token at once. Drops `seq` if the stream stops early
    (close it, with `contextlib.aclosing`, so that this happens at once)."""
    if engine.params.instant:
        await _run(engine, seq)
        seq.generated = seq.max_tokens
        for i in range(seq.max_tokens):
            yield i, i + 1
        return
    engine.submit(seq)
    every, sent = engine.params.stream_every, 0
    try:
        while (n := await seq.tokens.get()) is not None:
            if n == 1 or n == seq.max_tokens or n - sent >= every:
                yield sent, n
                sent = n
    finally:
        if seq.generated < seq.max_tokens:
            engine.cancel(seq)


async def _stream(
    request: web.Request,
    engine: Engine,
    seq: Sequence,
    base: dict[str, Any],
    chat: bool,
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    head = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

    async def send(choice: dict[str, Any] | None, usage: Any = None) -> None:
        chunk = {**head, "choices": [choice] if choice else []}
        if usage is not None:
            chunk["usage"] = usage
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    def choice(start: int, end: int, last: bool) -> dict[str, Any]:
        finish = "length" if last else None
        piece = output_text(end, start, engine.params.chars_per_token)
        if chat:
            delta = {"content": piece}
            return {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}

    # Like vLLM, the role comes in the first chunk, once the first token exists.
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
    async with contextlib.aclosing(_pieces(engine, seq)) as pieces:
        async for start, end in pieces:
            if start == 0 and chat:
                await send(role)
            await send(choice(start, end, end == seq.max_tokens))
    if include_usage:
        await send(None, _usage(seq, seq.generated))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def responses(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`, as vLLM 0.32.0 without its response store."""
    engine = request.app[ENGINE]
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        parsed = parse_request(body)
    except ResponsesError as e:
        return _error(e.status, e.message, e.kind, e.param)
    max_tokens = parsed.max_output_tokens or engine.params.default_max_tokens
    seq = engine.prepare(render_messages(parsed.messages), max_tokens)
    if not engine.fits(seq):
        return _error(
            400,
            "The prompt and max_output_tokens exceed the model's length.",
            param="max_output_tokens",
        )
    response_id, item_id = new_ids()
    model = body.get("model") or request.app[SERVED]
    head = ResponseHead(response_id, item_id, int(time.time()), str(model), parsed)
    if parsed.stream:
        return await _stream_response(request, engine, seq, head)
    count = await _run(engine, seq)
    text = output_text(count, 0, engine.params.chars_per_token)
    answer = response_object(
        head, text, usage(seq.prompt_tokens, seq.cached_tokens, count)
    )
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def _stream_response(
    request: web.Request, engine: Engine, seq: Sequence, head: ResponseHead
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    events = EventStream(head)
    size = engine.params.chars_per_token

    async def send(batch: list[dict[str, Any]]) -> None:
        await response.write(
            b"".join(
                b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e))
                for e in batch
            )
        )

    # Like vLLM: created and in_progress at once, the message item with the
    # first token, and no `data: [DONE]` at the end.
    await send(events.opening())
    async with contextlib.aclosing(_pieces(engine, seq)) as pieces:
        async for start, end in pieces:
            first = events.first_token() if start == 0 else []
            await send([*first, events.delta(output_text(end, start, size))])
    used = usage(seq.prompt_tokens, seq.cached_tokens, seq.generated)
    await send(events.closing(output_text(seq.generated, 0, size), used))
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def models(request: web.Request) -> web.Response:
    served = request.app[SERVED]
    model = {
        "id": served,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": served,
        "max_model_len": request.app[ENGINE].params.max_model_len,
    }
    return web.json_response({"object": "list", "data": [model]}, dumps=_dumps)


def metrics_text(engine: Engine, served: str) -> str:
    """vLLM's metric names (0.32.0) with this engine's values."""
    labels = f'{{engine="0",model_name="{served}"}}'
    c = engine.counters
    rows = [
        ("gauge", "vllm:num_requests_running", len(engine.running)),
        ("gauge", "vllm:num_requests_waiting", len(engine.waiting)),
        ("gauge", "vllm:kv_cache_usage_perc", engine.cache.usage),
        ("counter", "vllm:prefix_cache_queries_total", c.prefix_queries),
        ("counter", "vllm:prefix_cache_hits_total", c.prefix_hits),
        ("counter", "vllm:prompt_tokens_total", c.prompt_tokens),
        ("counter", "vllm:generation_tokens_total", c.generation_tokens),
    ]
    lines = []
    for kind, name, value in rows:
        family = name.removesuffix("_total")
        lines.append(f"# TYPE {family} {kind}")
        lines.append(f"{name}{labels} {float(value)}")
    lines.append("# TYPE vllm:request_success counter")
    lines.append(
        f'vllm:request_success_total{{engine="0",finished_reason="length",'
        f'model_name="{served}"}} {float(c.requests_finished)}'
    )
    ttft = "vllm:time_to_first_token_seconds"
    lines.append(f"# TYPE {ttft} histogram")
    below = 0
    bounds = [*(str(b) for b in TTFT_BUCKETS_S), "+Inf"]
    for bound, count in zip(bounds, c.ttft_buckets, strict=True):
        below += count
        lines.append(
            f'{ttft}_bucket{{engine="0",le="{bound}",model_name="{served}"}} '
            f"{float(below)}"
        )
    lines.append(f"{ttft}_sum{labels} {c.ttft_sum_s}")
    lines.append(f"{ttft}_count{labels} {float(c.ttft_count)}")
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    text = metrics_text(request.app[ENGINE], request.app[SERVED])
    return web.Response(text=text, content_type="text/plain")


async def _start_engine(app: web.Application) -> None:
    app[ENGINE].start()


async def _stop_engine(app: web.Application) -> None:
    await app[ENGINE].stop()


def make_app(params: SimParams, served: str) -> web.Application:
    """One simulated replica serving the model name `served`."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ENGINE] = Engine(params)
    app[SERVED] = served
    app.on_startup.append(_start_engine)
    app.on_cleanup.append(_stop_engine)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
