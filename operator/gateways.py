"""Reading the gateways' demand: which gateways, and what their /metrics say.

Each gateway serves `citadel_gateway_model_requests{model_namespace, llmmodel,
state}` (state `in_flight`, `waiting` or `queued`); the autoscaler sums it per
model over every gateway it finds: the URLs the settings list, and the ready
endpoints of the gateway's metrics Service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from citadel.operator.kube.client import ApiError, Kube
from citadel.operator.kube.resources import ENDPOINT_SLICES, SERVICES
from citadel.operator.metrics import DEMAND_STATES

MODEL_REQUESTS = "citadel_gateway_model_requests"
"""The gateway's gauge of requests per model (the contract's name)."""
READ_TIMEOUT_S = 1.0
"""How long one gateway's /metrics may take: a gateway slower than that is one
that could not be read this tick."""
METRICS_PATH = "/metrics"
ModelKey = tuple[str, str]
"""(namespace, LLMModel name)."""
Fetch = Callable[[str], Awaitable[str]]

# One sample line: the name, its labels, the value (a timestamp may follow).
_LINE = re.compile(
    rf"^{MODEL_REQUESTS}\{{(?P<labels>.*)\}}\s+(?P<value>\S+)(\s+\S+)?\s*$"
)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass
class Demand:
    """Requests of one model at the gateways read."""

    in_flight: float = 0.0
    waiting: float = 0.0
    """Held for a model without a ready replica (at zero)."""
    queued: float = 0.0
    """Waiting at a gateway for a replica with room (maxRequestsPerReplica):
    the model has replicas, all busy; gateways before it count none."""

    @property
    def total(self) -> float:
        """In flight, waiting and queued: what the replicas must serve."""
        return self.in_flight + self.waiting + self.queued


@dataclass
class Reading:
    """One tick's read of every gateway.

    Attributes:
        demand: per model, summed over the gateways that answered.
        answered: how many gateways answered.
        failures: one line per gateway (or discovery) that failed.
    """

    demand: dict[ModelKey, Demand] = field(default_factory=dict)
    answered: int = 0
    failures: list[str] = field(default_factory=list)


def _labels(text: str) -> dict[str, str] | None:
    found: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        if match is None:
            return None
        value = re.sub(
            r"\\.", lambda m: _UNESCAPE.get(m.group(0), m.group(0)), match[2]
        )
        found[match[1]] = value
        pos = match.end()
    return found


def parse_model_requests(text: str) -> dict[ModelKey, Demand]:
    """The model requests in a Prometheus text exposition; other families,
    comments and lines that do not parse are left out.

    Labels may come in any order; a value may be any float (`3.0`, `1e3`).
    """
    found: dict[ModelKey, Demand] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        labels = _labels(match["labels"])
        if labels is None or labels.get("state") not in DEMAND_STATES:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if not value >= 0:  # NaN or negative: not a count
            continue
        key = (labels.get("model_namespace", ""), labels.get("llmmodel", ""))
        if not all(key):
            continue
        demand = found.setdefault(key, Demand())
        state = labels["state"]
        if state == "waiting":
            demand.waiting += value
        elif state == "queued":
            demand.queued += value
        else:
            demand.in_flight += value
    return found


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def _port_name(service: Mapping[str, Any]) -> str | None:
    """The name of the Service port read: `metrics` if it has one, else the
    first; None when it has no port."""
    ports = service.get("spec", {}).get("ports") or []
    if not ports:
        return None
    names = [str(p.get("name") or "") for p in ports]
    return "metrics" if "metrics" in names else names[0]


def endpoint_urls(
    service: Mapping[str, Any], slices: list[dict[str, Any]]
) -> list[str]:
    """The /metrics URLs of the Service's ready endpoints."""
    port_name = _port_name(service)
    if port_name is None:
        return []
    urls: list[str] = []
    for piece in slices:
        if piece.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = next(
            (
                p.get("port")
                for p in piece.get("ports") or []
                if str(p.get("name") or "") == port_name
            ),
            None,
        )
        if port is None:
            continue
        for endpoint in piece.get("endpoints") or []:
            # An absent `ready` is to be read as ready (the API's doc).
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in (endpoint.get("addresses") or [])[:1]:
                urls.append(f"http://{_host(address)}:{port}{METRICS_PATH}")
    return sorted(set(urls))


class Gateways:
    """Finds the gateways and reads their demand.

    Args:
        kube: reads the metrics Service and its EndpointSlices.
        urls: /metrics URLs read as they are.
        service: `namespace/name` of the gateways' metrics Service, or "".
        fetch: reads one URL's exposition (default: an HTTP GET, filtered to
            the gauge by `name[]`, within READ_TIMEOUT_S).
    """

    def __init__(
        self,
        kube: Kube,
        urls: tuple[str, ...],
        service: str,
        fetch: Fetch | None = None,
    ) -> None:
        self._kube = kube
        self._urls = urls
        self._service = service
        self._fetch = fetch or self._get
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Closes the HTTP connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _discover(self, reading: Reading) -> list[str]:
        urls = list(self._urls)
        if not self._service:
            return urls
        namespace, name = self._service.split("/", 1)
        try:
            service = await self._kube.get(SERVICES, name, namespace, cached=True)
            slices = await self._kube.list(
                ENDPOINT_SLICES,
                namespace,
                label_selector=f"kubernetes.io/service-name={name}",
            )
        except ApiError as err:
            reading.failures.append(f"Service {self._service}: {err}")
            return urls
        if service is None:
            reading.failures.append(f"Service {self._service} not found")
            return urls
        found = endpoint_urls(service, slices)
        if not found:
            reading.failures.append(f"Service {self._service} has no ready endpoint")
        return urls + [u for u in found if u not in urls]

    async def _get(self, url: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
            )
        async with self._session.get(url, params={"name[]": MODEL_REQUESTS}) as answer:
            if answer.status != 200:
                raise ValueError(f"answered {answer.status}")
            return await answer.text()

    async def read(self) -> Reading:
        """Reads every gateway at once; those that fail are named in
        `failures`."""
        reading = Reading()
        urls = await self._discover(reading)
        if not urls and not reading.failures:
            reading.failures.append("no gateway to read")
        answers = await asyncio.gather(
            *(self._fetch(url) for url in urls), return_exceptions=True
        )
        for url, answer in zip(urls, answers, strict=True):
            if isinstance(answer, BaseException):
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
                reason = str(answer) or type(answer).__name__
                reading.failures.append(f"{url}: {reason}")
                continue
            reading.answered += 1
            for key, demand in parse_model_requests(answer).items():
                total = reading.demand.setdefault(key, Demand())
                total.in_flight += demand.in_flight
                total.waiting += demand.waiting
                total.queued += demand.queued
        return reading
