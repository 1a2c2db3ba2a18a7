"""Requests waiting at the gateway for a replica with room: `ReplicaQueue` on
its own, then through the proxy for a model with `maxRequestsPerReplica`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from citadel.gateway.services import queueing
from citadel.gateway.services.auth import Priority
from citadel.gateway.services.queueing import ReplicaQueue

pytestmark = pytest.mark.unit

STANDARD, SHEDDABLE = Priority.STANDARD, Priority.SHEDDABLE
MODEL = ("llm", "smol")


class Room:
    """Replicas' room for `free` more requests: each `take` made here takes one
    for the request it names, or finds none."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.taken: list[str] = []

    def take(self, name: str) -> Callable[[], str | None]:
        def take() -> str | None:
            if self.free <= 0:
                return None
            self.free -= 1
            self.taken.append(name)
            return name

        return take


def wait(
    queue: ReplicaQueue[str],
    take: Callable[[], str | None],
    priority: Priority = STANDARD,
    within_s: float = 5.0,
    *,
    excludes: bool = False,
) -> asyncio.Task[tuple[str | None, bool]]:
    """A request waiting in `queue` for `MODEL`, as a task."""
    return asyncio.create_task(
        queue.take(MODEL, priority, take, within_s, excludes=excludes)
    )


async def queued(queue: ReplicaQueue[str], n: int) -> None:
    """Lets the tasks made run until `n` requests wait."""
    for _ in range(10):
        await asyncio.sleep(0)
    assert queue.waiting(MODEL) == n


async def test_a_request_is_served_at_once_while_a_replica_has_room() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room(free=1)
    assert await queue.take(MODEL, STANDARD, room.take("a"), 30) == ("a", False)
    assert queue.waiting(MODEL) == 0
    assert room.taken == ["a"]


async def test_standard_goes_before_sheddable_each_in_arrival_order() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    tasks = {}
    for name, priority in [
        ("s1", SHEDDABLE),
        ("a1", STANDARD),
        ("s2", SHEDDABLE),
        ("a2", STANDARD),
    ]:
        tasks[name] = wait(queue, room.take(name), priority)
        await queued(queue, len(tasks))
    for served in range(1, 5):
        room.free += 1
        queue.offer(MODEL)
        assert len(room.taken) == served
        assert queue.waiting(MODEL) == 4 - served
    assert room.taken == ["a1", "a2", "s1", "s2"]
    for name, task in tasks.items():
        assert await task == (name, True)


async def test_one_offer_serves_as_many_as_have_room() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    tasks = [wait(queue, room.take(name)) for name in ("a", "b", "c")]
    await queued(queue, 3)
    room.free = 2
    queue.offer(MODEL)
    assert room.taken == ["a", "b"]
    assert queue.waiting(MODEL) == 1
    room.free = 1
    queue.offer_all()
    assert [await t for t in tasks] == [("a", True), ("b", True), ("c", True)]
    assert queue.waiting(MODEL) == 0


async def test_a_request_that_excludes_some_and_finds_none_blocks_none() -> None:
    """A retry leaves the replicas it tried out: that it finds none says
    nothing of the others, which are offered the room all the same."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    retry = wait(queue, lambda: None, excludes=True)
    await queued(queue, 1)
    after = wait(queue, room.take("after"))
    await queued(queue, 2)
    room.free = 1
    queue.offer(MODEL)
    assert await after == ("after", True)
    assert not retry.done()
    assert queue.waiting(MODEL) == 1
    # Arriving with room, one behind it is served at once.
    room.free = 1
    assert await queue.take(MODEL, STANDARD, room.take("later"), 30) == (
        "later",
        False,
    )
    retry.cancel()
    with pytest.raises(asyncio.CancelledError):
        await retry
    assert queue.waiting(MODEL) == 0


async def test_a_request_that_excludes_nothing_and_finds_none_stops_the_offer() -> None:
    """None after it would find a replica (one `take` finding none says every
    one is at its bound): they are not asked, and keep their turn."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    asked: list[str] = []

    def finds_none() -> None:
        asked.append("first")
        return None

    def finds_one() -> str:
        asked.append("second")
        return "r"

    first = wait(queue, finds_none)
    await queued(queue, 1)
    second = wait(queue, finds_one)
    await queued(queue, 2)
    queue.offer(MODEL)
    queue.offer_all()
    assert "second" not in asked
    assert not second.done()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    # Its turn come, the second takes the room it finds.
    queue.offer(MODEL)
    assert await second == ("r", True)


async def test_a_request_that_waits_too_long_gets_none_and_leaves_the_queue() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await queue.take(MODEL, STANDARD, room.take("a"), 0.05) == (None, True)
    assert loop.time() - began >= 0.05
    assert queue.waiting(MODEL) == 0
    # Room later is nobody's.
    room.free = 1
    queue.offer(MODEL)
    assert room.taken == []


async def test_no_time_to_wait_is_an_answer_at_once() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    found = await asyncio.wait_for(
        queue.take(MODEL, STANDARD, Room().take("a"), 0), 0.5
    )
    assert found[0] is None
    assert queue.waiting(MODEL) == 0


async def test_a_cancelled_request_leaves_the_queue() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    gone = wait(queue, room.take("gone"))
    await queued(queue, 1)
    stays = wait(queue, room.take("stays"))
    await queued(queue, 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert queue.waiting(MODEL) == 1
    room.free = 1
    queue.offer(MODEL)
    assert await stays == ("stays", True)
    assert room.taken == ["stays"]
    assert queue.waiting(MODEL) == 0


async def test_a_request_cancelled_as_it_is_served_leaves_it_taken() -> None:
    """The cancel comes before its task runs again: what `take` took is the
    caller's to give back (the proxy frees the replica it counts)."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    task = wait(queue, room.take("a"))
    await queued(queue, 1)
    task.cancel()
    room.free = 1
    queue.offer(MODEL)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert room.taken == ["a"]
    assert queue.waiting(MODEL) == 0


async def test_what_take_raises_is_its_requests_answer_not_the_offers() -> None:
    """`offer` runs in the task of another request (the one whose replica
    freed): an error of a waiter's `take` (its model has no replica left)
    reaches that waiter alone, and the offer goes on to the next."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    gone = False

    def fails_later() -> str | None:
        if gone:
            raise RuntimeError("no replica left")
        return None

    failing = wait(queue, fails_later, excludes=True)
    await queued(queue, 1)
    after = wait(queue, room.take("after"))
    await queued(queue, 2)
    gone, room.free = True, 1
    queue.offer(MODEL)  # raises nothing
    with pytest.raises(RuntimeError, match="no replica left"):
        await failing
    assert await after == ("after", True)
    assert queue.waiting(MODEL) == 0


async def test_an_error_at_once_is_raised_at_once() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()

    def fails() -> str | None:
        raise RuntimeError("no replica")

    with pytest.raises(RuntimeError, match="no replica"):
        await queue.take(MODEL, STANDARD, fails, 30)
    assert queue.waiting(MODEL) == 0


async def test_room_nobody_announced_is_found_by_the_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica back from an ejection frees nothing: the waiter looks again
    by itself."""
    monkeypatch.setattr(queueing, "RECHECK_S", 0.02)
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    task = wait(queue, room.take("a"))
    await queued(queue, 1)
    room.free = 1
    assert await asyncio.wait_for(task, 1) == ("a", True)
    assert queue.waiting(MODEL) == 0


async def test_room_found_as_the_wait_ends_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait's last look finds the room: the request gets its replica
    rather than a refusal (and the replica is not lost)."""
    monkeypatch.setattr(queueing, "RECHECK_S", 60.0)
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    task = wait(queue, room.take("a"), within_s=0.05)
    await queued(queue, 1)
    room.free = 1  # no offer: only the look at the end of the wait finds it
    assert await asyncio.wait_for(task, 1) == ("a", True)
    assert room.taken == ["a"]
    assert queue.waiting(MODEL) == 0


async def test_models_wait_apart() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    task = wait(queue, room.take("a"))
    await queued(queue, 1)
    other = ("llm", "big")
    room.free = 1
    queue.offer(other)
    assert not task.done()
    assert queue.waiting(other) == 0
    queue.offer(MODEL)
    assert await task == ("a", True)


async def test_closing_ends_every_wait_and_any_later_one() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    room = Room()
    waiting = [wait(queue, room.take("a")), wait(queue, room.take("b"), SHEDDABLE)]
    await queued(queue, 2)
    queue.close(lambda: RuntimeError("stopping"))
    for task in waiting:
        with pytest.raises(RuntimeError, match="stopping"):
            await task
    assert queue.waiting(MODEL) == 0
    # One that would wait is refused; one that finds room is served.
    with pytest.raises(RuntimeError, match="stopping"):
        await queue.take(MODEL, STANDARD, room.take("c"), 5.0)
    assert queue.waiting(MODEL) == 0
    room.free = 1
    assert await queue.take(MODEL, STANDARD, room.take("d"), 5.0) == ("d", False)
