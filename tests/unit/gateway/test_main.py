"""The gateway's entry point."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from citadel.gateway import main as entry
from citadel.gateway.routes import RoutingDocument
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.wiring import build_deps

pytestmark = pytest.mark.unit


class _Cycle:
    """Refers to itself, so only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Gives back to the collector whatever a test froze (it is one process), with
    automatic collection off meanwhile so that only the code under test collects."""
    gc.unfreeze()
    gc.disable()
    yield
    gc.enable()
    gc.unfreeze()


def refused_start(capsys: pytest.CaptureFixture[str]) -> str:
    """What `citadel-gateway` printed when it refused to start (exit code 2)."""
    with pytest.raises(SystemExit) as refused:
        entry.main([])
    assert refused.value.code == 2
    return capsys.readouterr().err


def test_startup_objects_are_frozen_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": []}))
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_SOURCE", "file")
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_FILE", str(routes))
    monkeypatch.setenv("CITADEL_GATEWAY_AUTH", "disabled")
    served: dict[str, Any] = {}
    garbage = weakref.ref(_Cycle())

    def run(server: Any) -> None:
        served["frozen"] = gc.get_freeze_count()
        served["garbage_left"] = garbage() is not None
        served["app"] = server.config.app
        server.started = True

    monkeypatch.setattr(entry._Server, "run", run)
    assert entry.main([]) == 0
    # The app, and what it was built from, sit in the permanent generation when
    # serving starts, so full collections under load do not walk them.
    assert served["frozen"] > 0
    assert not any(obj is served["app"] for obj in gc.get_objects())
    # Garbage from before is freed first, not frozen for good.
    assert not served["garbage_left"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SMOL = {"name": "smol", "namespace": "llm", "servedName": "smollm2", "service": "smol"}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_on_a_port_of_their_own_and_not_on_the_api_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": []}))
    port = _free_port()
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_SOURCE", "file")
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_FILE", str(routes))
    monkeypatch.setenv("CITADEL_GATEWAY_AUTH", "disabled")
    monkeypatch.setenv("CITADEL_GATEWAY_HOST", "127.0.0.1")
    monkeypatch.setenv("CITADEL_GATEWAY_METRICS_PORT", str(port))
    seen: dict[str, Any] = {}

    def run(server: Any) -> None:
        seen["metrics"] = _get(f"http://127.0.0.1:{port}/metrics")
        # A model routed (the routes file's source runs only once served).
        deps = server.config.app.app.state.deps
        deps.catalog.set_document(RoutingDocument.model_validate({"models": [SMOL]}))
        seen["demand"] = _get(
            f"http://127.0.0.1:{port}/metrics?name[]=citadel_gateway_model_requests"
        )

        async def api() -> httpx.Response:
            transport = httpx.ASGITransport(app=server.config.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gw"
            ) as client:
                return await client.get("/metrics")

        seen["api"] = asyncio.run(api())
        server.started = True

    monkeypatch.setattr(entry._Server, "run", run)
    assert entry.main([]) == 0
    status, text = seen["metrics"]
    assert status == 200 and "citadel_gateway_" in text
    # The family the operator's autoscaler reads, alone.
    status, text = seen["demand"]
    assert status == 200
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        f'citadel_gateway_model_requests{{llmmodel="smol",model_namespace="llm",'
        f'state="{state}"}} 0.0'
        for state in ("in_flight", "waiting")
    ]
    # The API port, which an Ingress may publish, does not serve them.
    assert seen["api"].status_code == 404
    assert seen["api"].json()["error"]["code"] == "not_found"
    # Stopped with the server.
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/metrics")


def test_the_metrics_port_must_be_a_port_of_its_own() -> None:
    for clash in ({"port": 9000}, {"grpc_port": 9000}):
        with pytest.raises(ValidationError, match="metrics_port 9000"):
            GatewaySettings(metrics_port=9000, **clash)  # type: ignore[arg-type]
    assert GatewaySettings(metrics_port=9090).metrics_port == 9090


def test_request_heads_past_the_settings_are_refused_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": []}))
    metrics_port = _free_port()
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_SOURCE", "file")
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_FILE", str(routes))
    monkeypatch.setenv("CITADEL_GATEWAY_AUTH", "disabled")
    monkeypatch.setenv("CITADEL_GATEWAY_HOST", "127.0.0.1")
    monkeypatch.setenv("CITADEL_GATEWAY_PORT", str(_free_port()))
    monkeypatch.setenv("CITADEL_GATEWAY_METRICS_PORT", str(metrics_port))
    monkeypatch.setenv("CITADEL_GATEWAY_MAX_HEADER_BYTES", "8192")
    monkeypatch.setenv("CITADEL_GATEWAY_HEAD_TIMEOUT_S", "0.3")
    seen: dict[str, bytes] = {}

    async def ask(port: int, pad: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-pad: %s\r\n" % (b"a" * pad)
        )
        writer.write(b"connection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    async def stall(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n")  # and no more
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    async def serve(server: Any) -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        seen["small"] = await ask(server.config.port, 4000)
        seen["large"] = await ask(server.config.port, 9000)
        seen["slow"] = await stall(server.config.port)
        server.should_exit = True
        await task

    def run(server: Any) -> None:
        asyncio.run(serve(server))
        seen["metrics"] = _get(f"http://127.0.0.1:{metrics_port}/metrics")[1].encode()

    monkeypatch.setattr(entry._Server, "run", run)
    assert entry.main([]) == 0
    assert seen["small"].startswith(b"HTTP/1.1 200 ")
    assert seen["large"].startswith(b"HTTP/1.1 431 ")
    assert seen["slow"].startswith(b"HTTP/1.1 408 ")
    assert b"citadel_gateway_headers_too_large_total 1.0" in seen["metrics"]
    assert b"citadel_gateway_head_timeouts_total 1.0" in seen["metrics"]


def test_the_socket_cap_per_key_comes_from_its_setting(tmp_path: Path) -> None:
    assert GatewaySettings().max_sockets_per_key == 64
    with pytest.raises(ValidationError, match="max_sockets_per_key"):
        GatewaySettings(max_sockets_per_key=-1)
    settings = GatewaySettings(
        routes_source="file",
        routes_file=tmp_path / "routes.json",
        auth="disabled",
        max_sockets_per_key=3,
    )
    assert build_deps(settings, {}).sockets.max_per_key == 3


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        ("0.0.0.0", "0.0.0.0"),
        ("::", "::"),
        ("0:0:0:0:0:0:0:0", "::"),
        ("127.0.0.1", "127.0.0.1"),  # the benchmarks' and tests' gateways
        ("::1", "::1"),
        ("10.0.0.7", "10.0.0.7"),
    ],
)
def test_the_listen_host_is_an_ip_address(host: str, kept: str) -> None:
    assert GatewaySettings(host=host).host == kept


@pytest.mark.parametrize(
    "host", ["localhost", "gateway.example", "", "0.0.0.0:8000", "[::]", "256.0.0.1"]
)
def test_a_listen_host_that_is_not_an_ip_address_stops_the_start(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anything was taken, and failed (or listened somewhere unexpected) only
    when each server bound it: it is refused at once, naming the variable to
    set and what it takes."""
    monkeypatch.setenv("CITADEL_GATEWAY_HOST", host)
    # Without the check, start-up goes on and fails at once on the cluster.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # One line naming the variable, what it was and what to set; no traceback.
    assert refused_start(capsys) == (
        "citadel-gateway: invalid settings\n"
        f"CITADEL_GATEWAY_HOST={host!r}: not an IP address: set 0.0.0.0 (every "
        "IPv4 address), :: (IPv6) or an address of this machine such as 127.0.0.1\n"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"CITADEL_GATEWAY_RETRIES": "many"},
            "CITADEL_GATEWAY_RETRIES='many': Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        # A problem of two settings together has no one variable to name.
        (
            {"CITADEL_GATEWAY_PORT": "8000", "CITADEL_GATEWAY_METRICS_PORT": "8000"},
            "metrics_port 8000 is also the HTTP or gRPC port: give it a port of "
            "its own, or 0 to serve /metrics on the HTTP port",
        ),
    ],
)
def test_bad_settings_stop_the_start_with_a_line_each(
    env: dict[str, str],
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert refused_start(capsys) == f"citadel-gateway: invalid settings\n{line}\n"


def test_the_head_timeout_is_a_positive_time() -> None:
    assert GatewaySettings().head_timeout_s == 30.0
    for wrong in (0, -1):
        with pytest.raises(ValidationError, match="head_timeout_s"):
            GatewaySettings(head_timeout_s=wrong)


def test_the_header_bound_stays_within_what_httptools_bears() -> None:
    assert GatewaySettings().max_header_bytes == 64 * 1024
    for wrong in (1024, 2 * 1024 * 1024):
        with pytest.raises(ValidationError, match="max_header_bytes"):
            GatewaySettings(max_header_bytes=wrong)


def test_no_cluster_and_no_routes_file_stops_the_start_with_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The message was there, at the end of a traceback."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("CITADEL_GATEWAY_KUBECONFIG", raising=False)
    monkeypatch.delenv("CITADEL_GATEWAY_ROUTES_SOURCE", raising=False)
    err = refused_start(capsys)
    assert err.startswith("citadel-gateway: not in a cluster")
    assert "CITADEL_GATEWAY_ROUTES_SOURCE=file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"CITADEL_GATEWAY_ROUTES_SOURCE": "file"}, "CITADEL_GATEWAY_ROUTES_FILE"),
        (
            {
                "CITADEL_GATEWAY_ROUTES_SOURCE": "file",
                "CITADEL_GATEWAY_ROUTES_FILE": "/nonexistent/routes.json",
            },
            "CITADEL_GATEWAY_KEYS_FILE",
        ),
    ],
)
def test_a_missing_routes_or_keys_file_stops_the_start_with_what_to_set(
    env: dict[str, str],
    missing: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the line about the cluster advises, set alone, ended in a
    traceback of its own."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("CITADEL_GATEWAY_KUBECONFIG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = refused_start(capsys)
    assert err.startswith(f"citadel-gateway: {missing} is required")
    assert "Traceback" not in err


def test_a_kubeconfig_whose_tls_data_is_no_pem_stops_the_start_in_a_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Valid base64 of no certificate passed the load and stopped the app's
    start-up in an SSLError traceback, exit code 3."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [
                    {
                        "name": "k",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": "aGVsbG8=",  # hello
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t0k"}}],
            }
        )
    )
    monkeypatch.setenv("CITADEL_GATEWAY_KUBECONFIG", str(kubeconfig))
    assert refused_start(capsys) == (
        "citadel-gateway: kubeconfig certificate-authority-data holds no PEM "
        "certificate\n"
    )
