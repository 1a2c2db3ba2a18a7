"""Reading the gateways' demand: the exposition format, and which gateways."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from citadel.operator.gateways import (
    MODEL_REQUESTS,
    Demand,
    Gateways,
    endpoint_urls,
    parse_model_requests,
)
from citadel.operator.kube.fake import FakeKube

pytestmark = pytest.mark.unit


def exposition() -> str:
    """What a gateway serves, written by prometheus_client itself."""
    registry = CollectorRegistry()
    gauge = Gauge(
        MODEL_REQUESTS,
        "Requests per model.",
        ["model_namespace", "llmmodel", "state"],
        registry=registry,
    )
    gauge.labels("llm", "mixtral", "in_flight").set(3)
    gauge.labels("llm", "mixtral", "waiting").set(2)
    gauge.labels("team-a", "small", "in_flight").set(0)
    gauge.labels("team-a", "small", "waiting").set(0)
    gauge.labels("llm", 'odd"name\\', "in_flight").set(1.5)
    # Another family whose name begins alike, and one that shares the labels.
    Counter(
        f"{MODEL_REQUESTS}_other",
        "Not the gauge.",
        ["model_namespace", "llmmodel", "state"],
        registry=registry,
    ).labels("llm", "mixtral", "in_flight").inc(100)
    return generate_latest(registry).decode()


def test_parses_what_prometheus_client_writes() -> None:
    found = parse_model_requests(exposition())
    assert found == {
        ("llm", "mixtral"): Demand(in_flight=3.0, waiting=2.0),
        ("team-a", "small"): Demand(),
        ("llm", 'odd"name\\'): Demand(in_flight=1.5),
    }
    assert found[("llm", "mixtral")].total == 5.0


def test_labels_in_any_order_and_other_lines_ignored() -> None:
    text = "\n".join(
        [
            "# HELP citadel_gateway_model_requests x",
            "# TYPE citadel_gateway_model_requests gauge",
            'citadel_gateway_model_requests{state="waiting",llmmodel="m",'
            'model_namespace="ns"} 4.0',
            'citadel_gateway_model_requests{llmmodel="m",model_namespace="ns",'
            'state="in_flight",} 1e1 1700000000000',
            'citadel_gateway_model_requests{model_namespace="ns",llmmodel="m",'
            'state="queued"} 2',
            'citadel_gateway_model_requests{model_namespace="ns",llmmodel="m",'
            'state="sleeping"} 7',
            'citadel_gateway_model_requests{model_namespace="ns",state="waiting"} 7',
            'citadel_gateway_model_requests{model_namespace="ns",llmmodel="m",'
            'state="waiting"} NaN',
            'citadel_gateway_model_requests{model_namespace="ns",llmmodel="m",'
            'state="waiting"} -3',
            'citadel_gateway_requests_total{model_namespace="ns",llmmodel="m",'
            'state="waiting"} 9',
            "garbage",
        ]
    )
    assert parse_model_requests(text) == {("ns", "m"): Demand(10.0, 4.0, 2.0)}


SERVICE = {
    "metadata": {"name": "gw-metrics", "namespace": "citadel-system"},
    "spec": {"ports": [{"name": "http", "port": 80}, {"name": "metrics", "port": 9}]},
}


def slice_of(
    addresses: list[tuple[str, bool | None]],
    ports: list[dict[str, Any]],
    address_type: str = "IPv4",
) -> dict[str, Any]:
    endpoints = []
    for address, ready in addresses:
        conditions = {} if ready is None else {"ready": ready}
        endpoints.append({"addresses": [address], "conditions": conditions})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "gw-metrics-abc",
            "namespace": "citadel-system",
            "labels": {"kubernetes.io/service-name": "gw-metrics"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


PORTS = [{"name": "http", "port": 8000}, {"name": "metrics", "port": 9090}]


def test_ready_endpoints_on_the_metrics_port() -> None:
    slices = [
        slice_of([("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)], PORTS),
        slice_of([("fd00::1", True)], PORTS, "IPv6"),
        slice_of([("gw.example", True)], PORTS, "FQDN"),
    ]
    assert endpoint_urls(SERVICE, slices) == [
        "http://10.0.0.1:9090/metrics",
        "http://10.0.0.3:9090/metrics",
        "http://[fd00::1]:9090/metrics",
    ]


def test_the_first_port_without_one_named_metrics() -> None:
    service = {"spec": {"ports": [{"port": 80}]}}
    slices = [slice_of([("10.0.0.1", True)], [{"port": 8000}])]
    assert endpoint_urls(service, slices) == ["http://10.0.0.1:8000/metrics"]
    assert endpoint_urls({"spec": {}}, slices) == []


async def test_a_missing_service_is_a_failure_named() -> None:
    gateways = Gateways(FakeKube(), (), "citadel-system/gw-metrics")
    reading = await gateways.read()
    assert reading.answered == 0
    assert reading.failures == ["Service citadel-system/gw-metrics not found"]


async def test_nothing_configured_reads_nothing_and_says_so() -> None:
    reading = await Gateways(FakeKube(), (), "").read()
    assert (reading.answered, reading.failures) == (0, ["no gateway to read"])


async def test_every_gateway_is_read_with_the_service_and_summed() -> None:
    kube = FakeKube()
    kube.put({"apiVersion": "v1", "kind": "Service", **SERVICE})
    kube.put(slice_of([("10.0.0.1", True), ("10.0.0.2", True)], PORTS))
    asked: list[str] = []

    async def fetch(url: str) -> str:
        asked.append(url)
        if "10.0.0.2" in url:
            raise TimeoutError()
        return exposition()

    static = "http://127.0.0.1:8080/metrics"
    reading = await Gateways(
        kube, (static,), "citadel-system/gw-metrics", fetch=fetch
    ).read()
    assert sorted(asked) == [
        "http://10.0.0.1:9090/metrics",
        "http://10.0.0.2:9090/metrics",
        static,
    ]
    assert reading.answered == 2
    assert reading.failures == ["http://10.0.0.2:9090/metrics: TimeoutError"]
    assert reading.demand[("llm", "mixtral")] == Demand(6.0, 4.0)


async def test_a_gateway_is_asked_for_the_gauge_alone() -> None:
    asked: list[tuple[str, list[str]]] = []

    async def metrics(request: web.Request) -> web.Response:
        asked.append((request.path, request.query.getall("name[]", [])))
        return web.Response(text=exposition())

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="no")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/broken", broken)
    async with TestServer(app) as server:
        good, bad = str(server.make_url("/metrics")), str(server.make_url("/broken"))
        gateways = Gateways(FakeKube(), (good, bad), "")
        try:
            reading = await gateways.read()
        finally:
            await gateways.close()
    assert asked == [("/metrics", [MODEL_REQUESTS])]
    assert reading.answered == 1
    assert reading.failures == [f"{bad}: answered 500"]
    assert reading.demand[("llm", "mixtral")] == Demand(3.0, 2.0)
