"""The entry point: settings read from the environment and handed to Kopf."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kopf._core.engines.probing import health_reporter

from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import ApiError
from citadel.operator.kube.resources import PODS
from citadel.operator.main import (
    connect,
    kopf_settings,
    liveness_endpoint,
    main,
    serve_metrics,
)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::", 0))
        port: int = sock.getsockname()[1]
        return port


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://0.0.0.0:8081/healthz"),
        # Unbracketed, `http://:::8081` names no host Kopf could listen on.
        ("::", "http://[::]:8081/healthz"),
    ],
)
def test_the_liveness_endpoint_listens_on_the_listen_host(
    settings: OperatorSettings, host: str, url: str
) -> None:
    on = settings.model_copy(update={"listen_host": host})
    assert liveness_endpoint(on) == url
    off = settings.model_copy(update={"listen_host": host, "health_port": 0})
    assert liveness_endpoint(off) is None


@pytest.mark.ipv6
async def test_kopf_serves_the_liveness_endpoint_to_ipv6_probes() -> None:
    """On an IPv6 cluster the kubelet probes the pod's IPv6 address: a server
    on 0.0.0.0 refuses it, and the operator is restarted over and over."""
    port = _free_port()
    settings = OperatorSettings(listen_host="::", health_port=port, metrics_port=0)
    url = liveness_endpoint(settings)
    assert url is not None
    ready = asyncio.Event()
    reporter = asyncio.create_task(
        health_reporter(
            url,
            memo=kopf.Memo(),
            indices={},
            registry=kopf.OperatorRegistry(),
            settings=kopf.OperatorSettings(),
            ready_flag=ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
        status = await asyncio.to_thread(_status, f"http://[::1]:{port}/healthz")
        assert status == 200
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


@pytest.mark.ipv6
def test_metrics_are_served_to_ipv6_scrapes() -> None:
    port = _free_port()
    settings = OperatorSettings(listen_host="::", metrics_port=port, health_port=0)
    stop = serve_metrics(settings, Metrics().registry)
    try:
        assert _status(f"http://[::1]:{port}/metrics") == 200
    finally:
        stop()


def test_metrics_turned_off_serve_nothing(settings: OperatorSettings) -> None:
    serve_metrics(settings.model_copy(update={"metrics_port": 0}), Metrics().registry)()


@pytest.fixture
def collector() -> Iterator[None]:
    """Gives the collector back as it was: a test that runs main tunes it for
    the whole (test) process."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_the_collector_is_tuned_before_kopf_runs(
    monkeypatch: pytest.MonkeyPatch, collector: None
) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_METRICS_PORT", "0")
    monkeypatch.setenv("CITADEL_OPERATOR_HEALTH_PORT", "0")
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    seen: dict[str, Any] = {}

    def run(**_: Any) -> None:
        seen["thresholds"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(kopf, "run", run)
    assert main([]) == 0
    # Full collections far apart (see tune_collector).
    assert seen["thresholds"][2] >= 100
    # Start-up's objects are left out of full collections.
    assert seen["frozen"] > 10_000
