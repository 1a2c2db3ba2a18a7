"""The gateway's settings: read once from the environment by the entry point.

Every field is an environment variable `CITADEL_GATEWAY_<FIELD>` (for example
`CITADEL_GATEWAY_ROUTES_SOURCE=file`). The Helm chart sets them; keep the names
stable.
"""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RoutesSource(enum.StrEnum):
    """Where the routing document and the replicas' addresses come from."""

    KUBERNETES = "kubernetes"
    FILE = "file"


class AuthMode(enum.StrEnum):
    """Whether requests need an API key."""

    REQUIRED = "required"
    DISABLED = "disabled"


class LogFormat(enum.StrEnum):
    """How log lines are written."""

    JSON = "json"
    TEXT = "text"


ENV_PREFIX = "CITADEL_GATEWAY_"


class GatewaySettings(BaseSettings):
    """Typed configuration of one gateway process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    host: str = "0.0.0.0"
    """Address the HTTP, gRPC and `/metrics` ports listen on: an IP address,
    `0.0.0.0` (every IPv4 address) or `::` (IPv6) in a pod, `127.0.0.1` for
    this machine alone. Names such as `localhost` are refused."""
    port: int = Field(8000, ge=1, le=65535)
    """Port to listen on."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """Port of the gRPC API (`citadel.v1`, docs/grpc.md), served by the same
    process on `host`; 0 (default) turns it off."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Port that serves `/metrics` on `host`, and then `port` does not: an
    Ingress in front of `port` cannot publish the metrics (key names, traffic per
    key, pod addresses). 0 (default) serves them on `port`."""
    routes_source: RoutesSource = RoutesSource.KUBERNETES
    """`kubernetes` (watch the ConfigMap and EndpointSlices) or `file`."""
    routes_file: Path | None = None
    """The routing document (JSON) when `routes_source` is `file`; reloaded when it
    changes. Each model lists its replicas' URLs under `endpoints`."""
    keys_file: Path | None = None
    """A static key file (JSON, written by `citadel keys create --file`). Used
    instead of Kubernetes Secrets when set, or when `routes_source` is `file`."""
    namespace: str = "citadel-system"
    """Namespace of the API-key Secrets, and of the `citadel-routes` ConfigMap
    unless `routes_namespace` names another."""
    routes_namespace: str = ""
    """Namespace of the `citadel-routes` ConfigMap when it is not `namespace`: a
    gateway of its own (its own keys) beside another release's operator."""
    kubeconfig: Path | None = None
    """A kubeconfig file; empty means the in-cluster service account."""
    kube_context: str | None = None
    """The kubeconfig context to use; empty means its current context."""
    auth: AuthMode = AuthMode.REQUIRED
    """`required` (default) or `disabled`: serving without keys must be explicit."""
    redis_url: str = ""
    """Redis for limits shared by every gateway replica; empty keeps them in
    process (one replica)."""
    redis_timeout_s: float = Field(0.25, gt=0)
    """How long a Redis call may take before limits fail open for that request;
    without it a stalled Redis would hold every request for the client's
    default of seconds."""
    share_placements: bool = True
    """With `redis_url` set, publish each `prefix-aware` placement (which
    replica was sent which prompt prefix) to the other gateway replicas and
    record theirs (Redis pub/sub), so that a conversation whose turns reach
    different gateway replicas stays on one model replica. False keeps each
    gateway's placements its own (Redis then serves the limits alone)."""
    placements_channel: str = ""
    """The Redis channel of the placements; empty: `citadel:placements:`
    and the routing document's namespace (`routes_namespace`, else
    `namespace`), so that releases sharing one Redis keep theirs apart."""
    placements_flush_s: float = Field(0.005, gt=0, le=1)
    """How long a placement waits for others to share its Redis message: the
    longer, the fewer messages, and the later the other gateways know it."""
    shutdown_grace_s: int = Field(30, ge=0)
    """After SIGTERM, how long requests in flight (open streams too) may finish
    before they are cut (503 `shutting_down`), REST and gRPC at once. Keep it
    below the pod's termination grace period (the chart derives it from that)."""
    log_format: LogFormat = LogFormat.JSON
    """`json` (one object per line) or `text`."""
    log_level: str = "INFO"
    """Python logging level name."""
    graphql_init_timeout_s: float = Field(10.0, gt=0)
    """How long a GraphQL WebSocket may stay open before its `connection_init`,
    which must carry a valid key; then it is closed (code 4408)."""
    max_sockets_per_key: int = Field(64, ge=0)
    """Most GraphQL WebSockets one key may hold open at once (in this gateway
    process); the next is refused at its `connection_init` (code 4429). 0 turns
    the cap off."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger ones get 413."""
    max_header_bytes: int = Field(64 * 1024, ge=8 * 1024, le=1024 * 1024)
    """Largest request line and headers accepted, in all; past it the request gets
    431 and its connection is closed. httptools has no bound of its own, and its
    cost grows with the square of a header's size: 1 MiB at most (Go's default)."""
    head_timeout_s: float = Field(30.0, gt=0)
    """Longest time a request line and headers may take from their first byte
    (and a new connection from its start to its first byte); past it the
    request gets 408 and its connection is closed. uvicorn bounds neither, so
    a client sending its headers a byte at a time held a socket for ever."""
    connect_timeout_s: float = Field(2.0, gt=0)
    """Time to open a connection to a replica before trying another; also the
    least time left of `read_timeout_s` for another try to start (at most half
    of `read_timeout_s`, or no retry could start)."""
    read_timeout_s: float = Field(600.0, gt=0)
    """Longest silence from a replica (between chunks) before a 504; also the
    most a request's tries take together until its answer begins."""
    scale_from_zero_timeout_s: float = Field(300.0, ge=0)
    """How long a request for a model whose route has `scaleFromZero` waits
    for a ready replica (while the autoscaler starts one) before a 503; 0
    answers 503 at once, as for any model without a ready replica."""
    queue_timeout_s: float = Field(60.0, ge=0)
    """How long a request for a model whose route has `maxRequestsPerReplica`
    waits at the gateway for a replica with room before a 503
    `model_overloaded`; 0 answers 503 at once when every replica is at it."""
    retries: int = Field(2, ge=0, le=10)
    """Extra replicas tried when a connection fails before any byte was sent,
    a replica refuses unworked (503, 429), or (once) one drops the request."""
    eject_after_failures: int = Field(3, ge=1)
    """Consecutive failures that take a replica out of rotation."""
    eject_base_s: float = Field(5.0, gt=0)
    """First ejection time; doubles for each ejection in a row, up to `eject_max_s`."""
    eject_max_s: float = Field(60.0, gt=0)
    """Longest ejection."""
    metrics_scrape_period_s: float = Field(2.0, gt=0)
    """How often each replica's vLLM `/metrics` is read (for `kv-aware`, and
    for load shedding)."""
    shed_queue_depth: int = Field(5, ge=0)
    """The most requests waiting at a replica (`vllm:num_requests_waiting`)
    while it still has room; more make it full, and while every ready replica
    of a model is, its sheddable requests get 503 `model_overloaded`."""
    shed_kv_cache_usage: float = Field(0.8, gt=0, le=1)
    """The largest fraction of a replica's KV cache in use
    (`vllm:kv_cache_usage_perc`) at which it still has room; more makes it
    full, as for `shed_queue_depth` (1: never by its cache)."""
    file_poll_period_s: float = Field(1.0, gt=0)
    """How often the routes file and the keys file are checked for changes."""
    session_header: str = "x-session-id"
    """Header whose value pins a conversation to one replica (`session-affinity`)."""
    default_max_tokens: int = Field(256, ge=1)
    """Tokens assumed for the reply when a request sets no `max_tokens`, to
    estimate its cost before the reply tells the real use."""
    max_key_labels: int = Field(100, ge=1)
    """Distinct key names used as metric labels; later ones are counted as
    `other`, so metrics stay bounded."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            # A name would be resolved by each of the three servers on its own
            # when it binds: a typo surfaced only then, as a resolver's error,
            # and a name says nothing certain of which addresses are served.
            raise ValueError(
                "not an IP address: set 0.0.0.0 (every IPv4 address), :: (IPv6) "
                "or an address of this machine such as 127.0.0.1"
            ) from None
        return str(address)

    @model_validator(mode="after")
    def _ports_apart(self) -> GatewaySettings:
        if self.metrics_port and self.metrics_port in (self.port, self.grpc_port):
            raise ValueError(
                f"metrics_port {self.metrics_port} is also the HTTP or gRPC port: "
                "give it a port of its own, or 0 to serve /metrics on the HTTP port"
            )
        return self


def explain(error: ValidationError) -> str:
    """What is wrong with the environment, one line per problem, each naming the
    variable (`CITADEL_GATEWAY_HOST='localhost': not an IP address: ...`); a
    problem of two settings together (the ports) as its message alone.

    Args:
        error: what GatewaySettings() raised.
    """
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            variable = f"{ENV_PREFIX}{str(problem['loc'][0]).upper()}"
            lines.append(f"{variable}={problem['input']!r}: {message}")
        else:
            lines.append(message)
    return "\n".join(lines)
