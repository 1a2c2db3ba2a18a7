"""A small stand-in for a vLLM replica: OpenAI API, SSE streaming, `/metrics`.

Run as a process: `python fake_backend.py --name a` prints `listening on PORT` once
it serves on 127.0.0.1. Every answer names the replica (`system_fingerprint` and the
`x-replica` header); `GET /received` returns the bodies received so far, so tests
can see exactly what the gateway forwarded.

Knobs a request may carry (unknown parameters, forwarded by the gateway):
`fake_delay_s` (wait before answering), `fake_status` (answer with this status),
`fake_chunks` (how many content chunks a stream sends), `fake_hold` (a stream
stops after its first chunk until `POST /release`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

RECEIVED = web.AppKey("received", list)
NAME = web.AppKey("name", str)
RUNNING = web.AppKey("running", list)
HOLD = web.AppKey("hold", asyncio.Event)


def _usage(body: dict[str, Any], completion: int) -> dict[str, int]:
    prompt = max(1, len(json.dumps(body.get("messages") or body.get("prompt"))) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _common(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    app = request.app
    try:
        body = await request.json()
    except ValueError:
        return {}, web.json_response({"error": {"message": "bad json"}}, status=400)
    app[RECEIVED].append(
        {"path": request.path, "body": body, "headers": dict(request.headers)}
    )
    delay = body.get("fake_delay_s")
    if isinstance(delay, int | float) and 0 < delay < 60:
        await asyncio.sleep(delay)
    status = body.get("fake_status")
    if isinstance(status, int) and 400 <= status < 600:
        error = {
            "message": f"fake error {status}",
            "type": "fake",
            "param": None,
            "code": None,
        }
        return body, web.json_response({"error": error}, status=status)
    return body, None


def _headers(request: web.Request) -> dict[str, str]:
    return {
        "x-replica": request.app[NAME],
        "x-request-id-seen": request.headers.get("x-request-id", ""),
    }


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    request.app[RUNNING].append(1)
    try:
        body, error = await _common(request)
        if error is not None:
            return error
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 5
        words = [f"w{i}" for i in range(min(int(max_tokens), 8))]
        base = {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": request.app[NAME],
        }
        if body.get("stream") is True:
            return await _stream(request, body, base, words, chat)
        text = " ".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        answer = {**base, "choices": [choice], "usage": _usage(body, len(words))}
        return web.json_response(answer, headers=_headers(request))
    finally:
        request.app[RUNNING].pop()


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    base: dict[str, Any],
    words: list[str],
    chat: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", **_headers(request)}
    )
    await response.prepare(request)
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    count = body.get("fake_chunks")
    chunks = words[: count if isinstance(count, int) else len(words)]
    for word in chunks:
        delta = {"delta": {"content": word + " "}} if chat else {"text": word + " "}
        chunk = {**base, "choices": [{"index": 0, **delta, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if body.get("fake_hold"):
            # Hold the stream open until the test calls POST /release.
            await request.app[HOLD].wait()
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        usage = {**base, "choices": [], "usage": _usage(body, len(chunks))}
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.Response:
    body, error = await _common(request)
    if error is not None:
        return error
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
        for i in range(len(items))
    ]
    usage = {"prompt_tokens": len(items), "total_tokens": len(items)}
    answer = {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": usage,
    }
    return web.json_response(answer, headers=_headers(request))


async def release(request: web.Request) -> web.Response:
    request.app[HOLD].set()
    return web.json_response({"released": True})


async def received(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECEIVED])


async def metrics(request: web.Request) -> web.Response:
    running = len(request.app[RUNNING])
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        f'vllm:num_requests_waiting{{model_name="m"}} 0\n'
        f'vllm:kv_cache_usage_perc{{model_name="m"}} {min(1.0, running / 10)}\n'
    )
    return web.Response(text=text, content_type="text/plain")


def make_app(name: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[NAME] = name
    app[RECEIVED] = []
    app[RUNNING] = []
    app[HOLD] = asyncio.Event()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/received", received)
    app.router.add_post("/release", release)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(name: str, port: int) -> None:
    runner = web.AppRunner(make_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on {bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.name, args.port))


if __name__ == "__main__":
    main()
