"""The gateway's queue through the real gateway, over one simulated replica
that runs one request at a time (`--max-num-seqs 1`) under a route with
`maxRequestsPerReplica: 1`: what the replica cannot run waits at the gateway,
standard before sheddable, not at the replica; driven with the official
`openai` client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "smol"
HI: Any = [{"role": "user", "content": "hi"}]
FILL_TOKENS = 300
"""About 2 s at the simulator's 6.5 ms a decode step: long enough for the
requests sent behind it to be queued and counted."""
DEADLINE_S = 8.0
"""The longest any poll below waits for what it polls for."""


@pytest.fixture
def serial_replica(tmp_path: Path, helpers: Any) -> Iterator[str]:
    """One simulated replica serving "smol" that runs one request at a time:
    its base URL."""
    fast_prefill = ("--prefill-tokens-per-s", "10000000")
    with helpers.simulator(tmp_path, "--max-num-seqs", "1", *fast_prefill) as url:
        yield url


def ask(
    client: openai.OpenAI, *, max_tokens: int = 1
) -> tuple[float, openai.APIStatusError | None]:
    """Sends one chat: when it ended, and the error if it was refused."""
    try:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=max_tokens)
    except openai.APIStatusError as err:
        return time.monotonic(), err
    return time.monotonic(), None


def client_of(gateway: Any, key: str) -> openai.OpenAI:
    """The official client on `gateway` with `key`, retrying nothing."""
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30
    )


def queued_at(helpers: Any, gateway: Any) -> float:
    """The requests `gateway` holds for a replica with room now."""
    return float(
        helpers.counted(
            gateway.url,
            "citadel_gateway_model_requests",
            llmmodel=MODEL,
            state="queued",
        )
    )


def poll(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_requests_wait_at_the_gateway_and_standard_ones_go_first(
    tmp_path: Path, start_gateway: Any, helpers: Any, serial_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    batch_key, user_key = helpers.batch_and_user_keys(keys, MODEL)
    route = helpers.route(
        MODEL, [], endpoints=[serial_replica], maxRequestsPerReplica=1
    )
    gateway = start_gateway([route], keys)

    def client(key: str) -> openai.OpenAI:
        return client_of(gateway, key)

    def queued() -> float:
        return queued_at(helpers, gateway)

    def running_at_replica() -> float:
        return float(helpers.counted(serial_replica, "vllm:num_requests_running"))

    batch, user = client(batch_key), client(user_key)
    with batch, user, ThreadPoolExecutor(max_workers=8) as pool:
        fill = pool.submit(ask, user, max_tokens=FILL_TOKENS)
        poll("the first request never ran", lambda: running_at_replica() == 1)
        # Sheddable first, then standard: the standard one is served first.
        behind: list[Future[tuple[float, openai.APIStatusError | None]]] = []
        for waiting, sender in enumerate((batch, user, user), start=1):
            behind.append(pool.submit(ask, sender))
            poll(f"{waiting} not queued", lambda n=waiting: queued() == n)
        # The gateway holds them: the replica has none waiting of its own.
        assert helpers.counted(serial_replica, "vllm:num_requests_waiting") == 0
        assert not fill.done()
        _, err = fill.result()
        assert err is None
        ended = [future.result() for future in behind]
    assert [err for _, err in ended] == [None, None, None]
    sheddable_end, *standard_ends = (at for at, _ in ended)
    assert max(standard_ends) < sheddable_end
    assert queued() == 0

    def count(name: str, **labels: str) -> float:
        return float(helpers.counted(gateway.url, name, model=MODEL, **labels))

    wait = "citadel_gateway_queue_wait_seconds_count"
    assert count(wait, priority="standard") == 2
    assert count(wait, priority="sheddable") == 1


def test_a_request_that_waits_past_the_queue_timeout_is_refused(
    tmp_path: Path, start_gateway: Any, helpers: Any, serial_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "user", "--models", MODEL)
    route = helpers.route(
        MODEL, [], endpoints=[serial_replica], maxRequestsPerReplica=1
    )
    gateway = start_gateway([route], keys, queue_timeout_s="0.5")
    with client_of(gateway, key) as client, ThreadPoolExecutor(max_workers=2) as pool:
        fill = pool.submit(ask, client, max_tokens=FILL_TOKENS)
        poll(
            "the first request never ran",
            lambda: helpers.counted(serial_replica, "vllm:num_requests_running") == 1,
        )
        sent = time.monotonic()
        ended, err = ask(client)
        assert err is not None, "answered, not refused"
        assert err.status_code == 503, err
        assert err.code == "model_overloaded", err
        assert "maxRequestsPerReplica" in err.message
        assert int(err.response.headers["retry-after"]) >= 1
        # Refused once its wait was over, not at once and not after the fill.
        assert ended - sent >= 0.5
        assert not fill.done()
        assert fill.result()[1] is None
        # Room again: served at once.
        assert ask(client)[1] is None
    assert (
        helpers.counted(
            gateway.url, "citadel_gateway_requests_total", model=MODEL, status="503"
        )
        == 1
    )


def test_places_kept_for_standard_requests_are_not_taken_by_sheddable_ones(
    tmp_path: Path, start_gateway: Any, helpers: Any
) -> None:
    """A replica that runs two requests at once under a bound of 2 with one
    place kept: a sheddable request runs, a second waits at the gateway, and a
    standard one sent after it runs at once in the kept place."""
    keys = tmp_path / "keys.json"
    batch_key, user_key = helpers.batch_and_user_keys(keys, MODEL)
    fast_prefill = ("--prefill-tokens-per-s", "10000000")
    with helpers.simulator(tmp_path, "--max-num-seqs", "2", *fast_prefill) as url:
        route = helpers.route(
            MODEL,
            [],
            endpoints=[url],
            maxRequestsPerReplica=2,
            reservedPerReplica=1,
        )
        gateway = start_gateway([route], keys)

        def queued() -> float:
            return queued_at(helpers, gateway)

        batch, user = client_of(gateway, batch_key), client_of(gateway, user_key)
        with batch, user, ThreadPoolExecutor(max_workers=4) as pool:
            first = pool.submit(ask, batch, max_tokens=FILL_TOKENS)
            poll(
                "the first request never ran",
                lambda: helpers.counted(url, "vllm:num_requests_running") == 1,
            )
            second = pool.submit(ask, batch, max_tokens=FILL_TOKENS)
            poll("the second sheddable request not queued", lambda: queued() == 1)
            # The kept place: answered while both sheddable ones are not.
            _, err = ask(user)
            assert err is None
            assert not first.done() and not second.done()
            assert queued() == 1
            assert first.result()[1] is None
            assert second.result()[1] is None
