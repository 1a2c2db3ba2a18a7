"""The memory of how long the API server asked to wait, and the fake that tells it."""

from __future__ import annotations

import pytest

from citadel.operator.kube.client import ApiError
from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.heed import AskedWait
from citadel.operator.kube.resources import SERVICES

pytestmark = pytest.mark.unit


def _throttled(seconds: float | None) -> ApiError:
    return ApiError(429, "TooManyRequests", "slow down", retry_after_s=seconds)


def test_the_latest_asked_wait_counts_up_to_the_cap() -> None:
    now = [0.0]
    wait = AskedWait(600.0, lambda: now[0])
    assert wait.left() == 0
    wait.heed(_throttled(30))
    now[0] = 10.0
    assert wait.left() == 20
    # A refusal that says nothing leaves the wait as it was.
    wait.heed(_throttled(None))
    wait.heed(ApiError(409, "Conflict", "changed"))
    assert wait.left() == 20
    # The newer answer's word stands, shorter or longer.
    wait.heed(_throttled(1))
    assert wait.left() == 1
    wait.heed(_throttled(3600))
    assert wait.left() == 600
    now[0] = 610.0
    assert wait.left() == 0


async def test_the_fake_tells_its_refusals_as_the_client_does() -> None:
    """Tests drive the wait through FakeKube: each refusal it raises, asked
    for (`fail`) or its own (a conflict, a failed patch test), is told."""
    now = [0.0]
    wait = AskedWait(600.0, lambda: now[0])
    heard: list[ApiError] = []

    def told(err: ApiError) -> None:
        heard.append(err)
        wait.heed(err)

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m"}}
    kube = FakeKube(on_refusal=told)
    kube.fail["services"] = _throttled(5)
    with pytest.raises(ApiError):
        await kube.list_uids(SERVICES, "llm")
    assert wait.left() == 5
    now[0] = 2.0
    with pytest.raises(ApiError):
        await kube.create(service)
    assert wait.left() == 5
    # What succeeds passes through as it is, and the wait stays.
    del kube.fail["services"]
    assert (await kube.create(service))["metadata"]["name"] == "m"
    assert (await kube.get(SERVICES, "m"))["metadata"]["name"] == "m"
    assert wait.left() == 5
    with pytest.raises(ApiError) as taken:
        await kube.create(service)
    test = [{"op": "test", "path": "/metadata/name", "value": "n"}]
    with pytest.raises(ApiError) as patched:
        await kube.json_patch(SERVICES, "m", None, test)
    assert heard[2:] == [taken.value, patched.value]
    assert [err.status for err in heard] == [429, 429, 409, 422]
