"""The entry point: settings read from the environment and handed to Kopf."""

from __future__ import annotations

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import ApiError
from citadel.operator.kube.resources import PODS
from citadel.operator.main import connect, kopf_settings, main
from citadel.operator.metrics import Metrics
from citadel.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


def test_the_peering_lifetime_reaches_kopf(settings: OperatorSettings) -> None:
    assert kopf_settings(settings, MemoryState()).peering.lifetime == 60
    longer = settings.model_copy(update={"peering_lifetime_seconds": 120})
    assert kopf_settings(longer, MemoryState()).peering.lifetime == 120


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("LOG_FORMAT", "xml", "CITADEL_OPERATOR_LOG_FORMAT='xml': Input should be"),
        # Not JSON: pydantic-settings fails before validating.
        ("POD_MONITOR_LABELS", "release=kps", 'field "pod_monitor_labels"'),
    ],
)
def test_bad_settings_stop_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    monkeypatch.setenv(f"CITADEL_OPERATOR_{variable}", value)
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("citadel-operator: invalid settings\n")
    assert said in err


async def test_the_clients_refusals_make_the_reconciler_wait(
    settings: OperatorSettings,
) -> None:
    """One AskedWait, told by the client, read by the reconciler: a wait
    asked on any request holds its periodic passes back."""

    async def respond(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "30"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", respond)
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube, reconciler = connect(
            lambda: kopf.ConnectionInfo(server=url), settings, Metrics()
        )
        try:
            assert reconciler.asked_wait.left() == 0
            with pytest.raises(ApiError):
                await kube.list(PODS)
        finally:
            await kube.close()
    assert reconciler.kube is kube
    assert 29 < reconciler.asked_wait.left() <= 30
