"""Two gateway processes sharing one Redis enforce one limit between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_two_gateways_share_one_rate_limit(
    tmp_path: Path,
    start_backend: Any,
    start_gateway: Any,
    helpers: Any,
    redis_url: str,
) -> None:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    # 3 per minute: one refills every 20 s, far longer than this test's requests.
    key = helpers.create_key(keys, "shared", "--rpm", "3")
    models = [helpers.route("smol", [backend])]
    first = start_gateway(models, keys, redis_url=redis_url)
    second = start_gateway(models, keys, redis_url=redis_url)
    statuses = []
    for i in range(8):
        gateway = (first, second)[i % 2]
        answer = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        statuses.append(answer.status_code)
    assert statuses.count(200) == 3
    assert statuses.count(429) == 5
    assert len(backend.received()) == 3
    rejected = first.metric("citadel_gateway_rate_limited_total") + second.metric(
        "citadel_gateway_rate_limited_total"
    )
    assert rejected == 5


def test_requests_are_served_while_redis_is_down(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> None:
    from socket import socket

    with socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "k", "--rpm", "1")
    gateway = start_gateway([helpers.route("smol", [backend])], keys, redis_url=dead)
    statuses = [
        httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        ).status_code
        for _ in range(2)
    ]
    assert statuses == [200, 200]  # limits fail open, serving goes on
    assert "store unavailable" in gateway.log.read_text()
