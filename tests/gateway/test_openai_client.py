"""The gateway as a real process, driven with the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MESSAGES: Any = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
def setup(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "alice", "--models", "smol*", "chat")
    limited = helpers.create_key(keys, "limited", "--rpm", "1")
    models = [
        helpers.route("smol", [backend], aliases=["chat"]),
        helpers.route("other", [backend]),
        helpers.route("empty", []),
    ]
    gateway = start_gateway(models, keys, read_timeout_s="2", max_body_bytes="4096")
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0
    ) as client:
        yield {
            "backend": backend,
            "gateway": gateway,
            "client": client,
            "key": key,
            "limited": limited,
        }


def test_chat_completion_embeddings_and_models(setup: dict[str, Any]) -> None:
    client: openai.OpenAI = setup["client"]
    chat = client.chat.completions.with_raw_response.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=3,
        extra_body={"top_k": 5, "vendor_thing": {"nested": [1, 2]}},
        extra_headers={"x-request-id": "req-42"},
    )
    assert chat.headers["x-request-id"] == "req-42"
    parsed = chat.parse()
    assert parsed.choices[0].message.content == "w0 w1 w2"
    assert parsed.usage is not None and parsed.usage.completion_tokens == 3
    completion = client.completions.create(model="smol", prompt="Once", max_tokens=2)
    assert completion.choices[0].text == "w0 w1"
    embedding = client.embeddings.create(model="smol", input=["a", "b"])
    assert len(embedding.data) == 2
    assert [m.id for m in client.models.list()] == ["smol", "chat"]
    first = setup["backend"].received()[0]
    assert first["body"]["model"] == "smol"  # the alias became the served name
    assert first["body"]["top_k"] == 5
    assert first["body"]["vendor_thing"] == {"nested": [1, 2]}
    assert first["headers"]["X-Request-ID"] == "req-42"
    assert "Authorization" not in first["headers"]  # the key stays at the gateway


def test_streaming_with_and_without_usage(setup: dict[str, Any]) -> None:
    client: openai.OpenAI = setup["client"]
    chunks = list(
        client.chat.completions.create(
            model="smol",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    plain = list(
        client.completions.create(model="smol", prompt="x", max_tokens=2, stream=True)
    )
    assert all(c.usage is None for c in plain) and len(plain) == 2
    # The gateway asked for usage anyway, and counted the tokens.
    assert setup["backend"].received()[1]["body"]["stream_options"] == {
        "include_usage": True
    }
    tokens = setup["gateway"].metric(
        'citadel_gateway_tokens_total{key="alice",kind="completion",model="smol"}'
    )
    assert tokens == 6


def test_first_chunk_is_relayed_while_the_backend_still_holds_the_stream(
    setup: dict[str, Any],
) -> None:
    client: openai.OpenAI = setup["client"]
    stream = client.chat.completions.create(
        model="smol", messages=MESSAGES, stream=True, extra_body={"fake_hold": True}
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content == "w0 "
    setup["backend"].release()
    rest = list(stream)
    assert rest and rest[-1].choices[0].delta.content == "w4 "


def test_errors_have_openai_types_and_statuses(setup: dict[str, Any]) -> None:
    client: openai.OpenAI = setup["client"]
    url = setup["gateway"].url
    bad = openai.OpenAI(base_url=url + "/v1", api_key="ctd-bad", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages="hi")  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as big:
        client.completions.create(model="smol", prompt="x" * 5000)
    assert big.value.status_code == 413
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(
            model="smol", messages=MESSAGES, extra_body={"fake_status": 500}
        )
    assert failed.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as slow:
        client.chat.completions.create(
            model="smol", messages=MESSAGES, extra_body={"fake_delay_s": 4}
        )
    assert slow.value.status_code == 504
    with pytest.raises(openai.BadRequestError) as passed:
        client.chat.completions.create(
            model="smol", messages=MESSAGES, extra_body={"fake_status": 400}
        )
    assert passed.value.message.endswith("fake error 400")


def test_no_ready_replica_is_503_with_retry_after(setup: dict[str, Any]) -> None:
    url = setup["gateway"].url
    answer = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "empty", "messages": MESSAGES},
        headers={"authorization": f"Bearer {setup['limited']}"},
    )
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert int(answer.headers["retry-after"]) >= 1


def test_rate_limit_429(setup: dict[str, Any]) -> None:
    with openai.OpenAI(
        base_url=setup["gateway"].url + "/v1", api_key=setup["limited"], max_retries=0
    ) as client:
        client.chat.completions.create(model="smol", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="smol", messages=MESSAGES)
    headers = limited.value.response.headers
    assert int(headers["retry-after"]) > 0
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert setup["gateway"].metric("citadel_gateway_rate_limited_total") == 1


def test_revoked_key_stops_working_without_restart(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    client: openai.OpenAI = setup["client"]
    client.models.list()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "citadel"),
            "keys",
            "--file",
            str(tmp_path / "keys.json"),
            "revoke",
            "alice",
        ],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return
        time.sleep(0.1)
    pytest.fail("the revoked key still works after 30 s")


def test_client_leaving_a_stream_frees_the_replica(setup: dict[str, Any]) -> None:
    gateway, key = setup["gateway"], setup["key"]
    body = {
        "model": "smol",
        "messages": MESSAGES,
        "stream": True,
        "fake_hold": True,
    }
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
    ) as stream:
        chunks = stream.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        assert gateway.metric("citadel_gateway_in_flight_requests") == 1
    # The client hung up mid-stream: the gateway lets go of the replica.
    deadline = time.monotonic() + 30
    while gateway.metric("citadel_gateway_in_flight_requests") != 0:
        assert time.monotonic() < deadline, "in-flight count never went back to 0"
        time.sleep(0.1)
    # ... because it saw the client go, not because the replica's silence ran
    # into the read timeout (2 s here), which would log `stream_broken`.
    ends = [
        json.loads(line)
        for line in gateway.log.read_text().splitlines()
        if '"msg":"request"' in line
    ]
    assert ends[-1]["code"] == "client_closed"
    setup["backend"].release()


def test_sigterm_lets_requests_in_flight_finish(setup: dict[str, Any]) -> None:
    gateway, key = setup["gateway"], setup["key"]
    client = httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    body = {"model": "smol", "messages": MESSAGES, "fake_delay_s": 1.5}
    with client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(client.post, "/v1/chat/completions", json=body)
            for _ in range(4)
        ]
        backend = setup["backend"]
        deadline = time.monotonic() + 30
        while len(backend.received()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.proc.send_signal(signal.SIGTERM)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 4
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert gateway.proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_sigterm_cuts_what_outlasts_the_shutdown_grace(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> None:
    # The grace is a setting (the chart derives it from the pod's termination
    # grace period): a request longer than it is cut, not waited for.
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "alice", "--models", "chat")
    models = [helpers.route("chat", [backend])]
    gateway = start_gateway(models, keys, shutdown_grace_s="1")
    client = httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    body = {"model": "chat", "messages": MESSAGES, "fake_delay_s": 20}
    with client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.post, "/v1/chat/completions", json=body)
        deadline = time.monotonic() + 30
        while not backend.received() and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=15) is not None  # not 20 s and more
        # Cut by the server, not by its client: an error in OpenAI's shape
        # (uvicorn alone answers a plain-text 500), counted so.
        answer = future.result()
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert answer.headers["retry-after"] == "1"
    lines = [json.loads(line) for line in gateway.log.read_text().splitlines()]
    [cut] = [line for line in lines if line.get("msg") == "request"]
    assert (cut["status"], cut["code"]) == (503, "shutting_down")
