"""Two gateway processes sharing one Redis keep each conversation on one replica,
whichever of them gets its turns.

Behind a Service without session affinity (the chart's two gateway replicas), a
conversation's turns reach both gateways; each routes by the prefixes it has seen,
and without the placements of the other it sends the turns it gets where it sent
its own. Four simulated vLLM replicas (bench/simulator) serve; the gateways' log
lines say which replica each conversation's turns went to.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from citadel_bench import procs

pytestmark = pytest.mark.integration

USERS = 7
TURNS = 4
LEARNED = 'citadel_gateway_placements_shared_total{direction="learned"}'
PUBLISHED = 'citadel_gateway_placements_shared_total{direction="published"}'


@pytest.fixture
def replicas(tmp_path: Path, helpers: Any) -> Iterator[list[str]]:
    argv = procs.simulator_argv(4, *helpers.fast_simulator)
    proc = procs.start("simulator", argv, tmp_path)
    try:
        ports = procs.wait_listening(proc)
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        procs.stop(proc)


def _converse(
    gateways: list[Any], key: str, settle: bool, sessions: str = "user"
) -> None:
    """Seven users, four turns each, a long text of each user's own at the head
    of its first message after a shared system prompt; each turn through the
    gateway of its turn's parity, the users in a different order each turn so
    that neither gateway's own tie-breaking puts a conversation back where the
    other sent it. With `settle`, each gateway has learned every placement of
    the other before the next request. Sessions are named `sessions`-user."""
    clients = [
        openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)
        for g in gateways
    ]
    system = "You answer questions about clusters. " * 40
    chats: list[list[Any]] = [
        [{"role": "system", "content": system}] for _ in range(USERS)
    ]
    order = random.Random(7)
    for turn in range(TURNS):
        users = list(range(USERS))
        order.shuffle(users)
        for user in users:
            messages = chats[user]
            own = f"User {user}'s notes: " + "lorem ipsum dolor " * 200 + "\n\n"
            question = f"Question {turn} from user {user}?"
            messages.append(
                {"role": "user", "content": own + question if turn == 0 else question}
            )
            answer = clients[turn % 2].chat.completions.create(
                model="chat",
                messages=messages,
                max_tokens=8,
                extra_headers={"x-session-id": f"{sessions}-{user}"},
            )
            messages.append(
                {"role": "assistant", "content": answer.choices[0].message.content}
            )
            if settle:
                _wait_learned(gateways)
    for client in clients:
        client.close()


def _wait_learned(gateways: list[Any]) -> None:
    """Until each gateway has learned as many placements as the other has
    published."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        first, second = gateways
        if first.metric(LEARNED) == second.metric(PUBLISHED) and second.metric(
            LEARNED
        ) == first.metric(PUBLISHED):
            return
        time.sleep(0.02)
    raise AssertionError("placements not learned within 10 s")


def _replicas_by_session(gateways: list[Any]) -> dict[str, list[tuple[str, str]]]:
    """Each session's (time, replica) of its requests, from both gateways' logs."""
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for gateway in gateways:
        for line in gateway.log.read_text().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("msg") == "request" and record.get("session"):
                found[record["session"]].append((record["ts"], record["replica"]))
    return found


def _start(
    replicas: list[str],
    start_gateway: Any,
    helpers: Any,
    tmp_path: Path,
    redis_url: str,
    **env: str,
) -> tuple[list[Any], str]:
    model = {
        "name": "chat",
        "namespace": "llm",
        "servedName": "chat",
        "service": "chat",
        "endpoints": replicas,
        "ready": True,
        "strategy": "prefix-aware",
    }
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "user")
    gateways = [
        start_gateway([model], keys, redis_url=redis_url, **env) for _ in range(2)
    ]
    return gateways, key


def test_two_gateways_sharing_redis_keep_each_conversation_on_one_replica(
    replicas: list[str],
    start_gateway: Any,
    helpers: Any,
    redis_url: str,
    tmp_path: Path,
) -> None:
    gateways, key = _start(replicas, start_gateway, helpers, tmp_path, redis_url)
    _converse(gateways, key, settle=True)
    sessions = _replicas_by_session(gateways)
    assert len(sessions) == USERS
    for session, sent in sessions.items():
        assert len(sent) == TURNS, session
        assert len({replica for _, replica in sent}) == 1, (session, sorted(sent))
    published = sum(g.metric(PUBLISHED) for g in gateways)
    assert published == USERS * TURNS
    assert sum(g.metric(LEARNED) for g in gateways) == published
    assert (
        sum(g.metric("citadel_gateway_placements_dropped_total") for g in gateways) == 0
    )


def test_without_sharing_the_gateways_split_conversations(
    replicas: list[str],
    start_gateway: Any,
    helpers: Any,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """The same conversations with the sharing turned off (Redis for the limits
    alone): the control that shows the test above can fail."""
    gateways, key = _start(
        replicas,
        start_gateway,
        helpers,
        tmp_path,
        redis_url,
        share_placements="false",
    )
    _converse(gateways, key, settle=False)
    sessions = _replicas_by_session(gateways)
    split = [s for s, sent in sessions.items() if len({r for _, r in sent}) > 1]
    assert split, sessions
    assert sum(g.metric(PUBLISHED) for g in gateways) == 0


class RedisServer:
    """redis-server on a port of its own, which can be stopped and started
    again on the same port (conftest's `redis_url` starts one for good)."""

    def __init__(self, port: int, cwd: Path) -> None:
        self.port, self.cwd = port, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed")
        args = ["--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [server, *args], stdout=subprocess.DEVNULL, cwd=self.cwd
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sharing_resumes_after_redis_comes_back(
    replicas: list[str],
    start_gateway: Any,
    helpers: Any,
    tmp_path: Path,
) -> None:
    """Redis restarted (its pod rescheduled): every request is served while it
    is away, and once both gateways have subscribed again their placements
    are shared as before."""
    redis = RedisServer(helpers.free_port(), tmp_path)
    redis.start()
    try:
        gateways, key = _start(replicas, start_gateway, helpers, tmp_path, redis.url)
        _converse(gateways, key, settle=True)
        redis.stop()
        _converse(gateways, key, settle=False)  # served by each gateway alone
        redis.start()
        deadline = time.monotonic() + 30
        while not all(
            "sharing placements again" in g.log.read_text() for g in gateways
        ):
            assert time.monotonic() < deadline, "sharing did not resume in 30 s"
            time.sleep(0.1)
        learned = [g.metric(LEARNED) for g in gateways]
        published = [g.metric(PUBLISHED) for g in gateways]
        _converse(gateways, key, settle=True, sessions="again")
        sessions = {
            s: sent
            for s, sent in _replicas_by_session(gateways).items()
            if s.startswith("again")
        }
        assert len(sessions) == USERS
        for session, sent in sessions.items():
            assert len({replica for _, replica in sent}) == 1, (session, sent)
        # Everything published since was learned by the other.
        assert gateways[0].metric(LEARNED) - learned[0] == (
            gateways[1].metric(PUBLISHED) - published[1]
        )
        assert gateways[1].metric(LEARNED) - learned[1] == (
            gateways[0].metric(PUBLISHED) - published[0]
        )
    finally:
        redis.stop()
