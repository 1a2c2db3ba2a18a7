"""Load shedding through the real gateway, over one simulated replica that runs
one request at a time (`--max-num-seqs 1`), so that a second request waits
there and the replica reports itself full (`vllm:num_requests_waiting`);
driven with the official `openai` client.

The waits poll with deadlines: when the gateway first reads the replica full
depends on its scrape period (0.5 s here), not on anything a test can wait for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "smol"
HEADER = "x-citadel-priority"
SHEDDABLE = {HEADER: "sheddable"}
HI: Any = [{"role": "user", "content": "hi"}]
FILLS = 3
"""Long standard requests sent at once: one runs, the others wait."""
FILL_TOKENS = 400
"""About 2.6 s each at the simulator's 6.5 ms a decode step: the replica is
full for two of them (about 5 s) at least, far longer than the gateway takes to
read it so (a scrape period)."""
DEADLINE_S = 8.0
"""The longest any poll below waits for what it polls for."""
PROBE_WAIT_S = 0.25
"""How long a sheddable probe is given to be refused before the next is sent:
one let through waits its turn behind the long requests."""


@pytest.fixture
def serial_replica(tmp_path: Path, helpers: Any) -> Iterator[str]:
    """One simulated replica serving "smol" that runs one request at a time,
    at the simulator's default decode speed: its base URL."""
    fast_prefill = ("--prefill-tokens-per-s", "10000000")
    with helpers.simulator(tmp_path, "--max-num-seqs", "1", *fast_prefill) as url:
        yield url


def ask(
    client: openai.OpenAI,
    *,
    max_tokens: int = 1,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError | None:
    """Sends one chat: None once it is answered, the error if it is refused."""
    try:
        client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=max_tokens, extra_headers=headers
        )
    except openai.APIStatusError as err:
        return err
    return None


def assert_shed(err: openai.APIStatusError | None) -> None:
    assert err is not None, "answered, not shed"
    assert err.status_code == 503, err
    assert err.code == "model_overloaded", err
    assert int(err.response.headers["retry-after"]) >= 1


def probe_until_shed(
    pool: ThreadPoolExecutor, client: openai.OpenAI
) -> tuple[openai.APIStatusError, list[Future[openai.APIStatusError | None]]]:
    """Sends sheddable requests until one is refused: the refusal, and every
    probe sent (those let through before the gateway read the replica full
    are answered once their turn comes)."""
    sent: list[Future[openai.APIStatusError | None]] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        probe = pool.submit(ask, client, headers=SHEDDABLE)
        sent.append(probe)
        try:
            err = probe.result(timeout=PROBE_WAIT_S)
        except TimeoutError:
            continue  # let through: it waits at the replica
        if err is not None:
            return err, sent
    pytest.fail(f"no sheddable request shed in {DEADLINE_S}s ({len(sent)} sent)")


def wait_waiting(helpers: Any, replica: str, at_least: int) -> None:
    """Polls the replica's own `/metrics` until `at_least` requests wait."""
    deadline = time.monotonic() + DEADLINE_S
    name = "vllm:num_requests_waiting"
    while helpers.counted(replica, name) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} waiting"
        time.sleep(0.02)


def test_sheddable_requests_are_refused_while_the_replica_is_full(
    tmp_path: Path, start_gateway: Any, helpers: Any, serial_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    # Sheddable by its record (the CLI's --priority); user's requests only by
    # the header.
    batch_key, user_key = helpers.batch_and_user_keys(keys, MODEL)
    gateway = start_gateway(
        [helpers.route(MODEL, [], endpoints=[serial_replica])],
        keys,
        shed_queue_depth="0",
    )

    def client(key: str, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=gateway.url + "/v1",
            api_key=key,
            max_retries=0,
            timeout=30,
            default_headers=headers,
        )

    batch, user = client(batch_key), client(user_key)
    # Idle: answered, and the model is watched from now on.
    assert ask(batch) is None
    refused = {"batch": 0, "user": 0}
    with batch, user, ThreadPoolExecutor(max_workers=32) as pool:
        fills = [pool.submit(ask, user, max_tokens=FILL_TOKENS) for _ in range(FILLS)]
        wait_waiting(helpers, serial_replica, 1)
        first, probes = probe_until_shed(pool, batch)
        assert_shed(first)
        # Full still (the long requests wait there): a standard request waits
        # its turn; the header lowers a standard key's request to sheddable.
        standard = pool.submit(ask, user, max_tokens=5)
        assert_shed(ask(user, headers=SHEDDABLE))
        refused["user"] += 1
        assert_shed(ask(batch))
        refused["batch"] += 1
        assert not standard.done()  # behind the long requests
        assert standard.result() is None  # answered once its turn came
        assert [fill.result() for fill in fills] == [None] * FILLS
        for probe in probes:
            if (err := probe.result()) is not None:
                assert_shed(err)
                refused["batch"] += 1
    with client(batch_key) as batch:
        # Done: the next read finds the replica with room again.
        deadline = time.monotonic() + DEADLINE_S
        while (err := ask(batch)) is not None:
            assert_shed(err)
            refused["batch"] += 1
            assert time.monotonic() < deadline, "still shed once the load was done"
            time.sleep(0.05)

    def count(name: str, **labels: str) -> float:
        return float(helpers.counted(gateway.url, name, model=MODEL, **labels))

    for key, n in refused.items():
        assert count("citadel_gateway_shed_total", key=key) == n
        assert count("citadel_gateway_requests_total", key=key, status="503") == n
    assert count("citadel_gateway_requests_total", key="user", status="200") == (
        FILLS + 1
    )


def test_a_priority_header_that_names_no_priority_is_refused(
    tmp_path: Path, start_gateway: Any, helpers: Any, smol_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "user", "--models", MODEL)
    gateway = start_gateway([helpers.route(MODEL, [], endpoints=[smol_replica])], keys)
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30
    ) as client:
        err = ask(client, headers={HEADER: "urgent"})
        assert isinstance(err, openai.BadRequestError), err
        assert HEADER in err.message
        assert ask(client, headers={HEADER: "standard"}) is None
