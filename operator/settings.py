"""The operator's configuration, read once from the environment at start-up."""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import json
import re
import urllib.parse
import warnings
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from citadel.operator import names
from citadel.operator.spec import IMAGE_PATTERN

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
# vLLM's `--host` as the releases before had it: a new default would roll every
# model at the operator's upgrade.
DEFAULT_VLLM_HOST = "0.0.0.0"
# The operator's own endpoints (metrics, /healthz) as the releases before had them.
DEFAULT_LISTEN_HOST = "0.0.0.0"
ENV_PREFIX = "CITADEL_OPERATOR_"
# A resync reconciles every model: more often than this it keeps the API server
# busy with nothing but resyncs.
MIN_RESYNC_SECONDS = 10.0


class LogFormat(enum.StrEnum):
    """How log lines are written."""

    JSON = "json"
    TEXT = "text"


class PeeringMode(enum.StrEnum):
    """Whether replicas of the operator coordinate through Kopf peering.

    `auto` peers when the KopfPeering CRDs and the peering object exist and runs
    standalone otherwise; `mandatory` refuses to start without them; `standalone`
    never peers (one replica only).
    """

    AUTO = "auto"
    MANDATORY = "mandatory"
    STANDALONE = "standalone"


class OperatorSettings(BaseSettings):
    """Settings of `citadel-operator`, from `CITADEL_OPERATOR_*` variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, use_attribute_docstrings=True
    )

    watch_namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    """Namespaces to watch, comma-separated, globs allowed (`team-*`, `llm-?`,
    `team-[ab]`); empty watches the whole cluster."""
    gateway_namespace: str = "citadel-system"
    """Where the routing ConfigMap is kept (the gateway's namespace)."""
    routes_configmap: str = "citadel-routes"
    """The routing ConfigMap's name."""
    default_vllm_image: str = DEFAULT_VLLM_IMAGE
    """The vLLM image for models that do not name one (a pinned tag)."""
    vllm_host: str = DEFAULT_VLLM_HOST
    """The address vLLM listens on in every model's pod (`--host`): `0.0.0.0`
    (IPv4 only), or `::` for single-stack IPv6 and IPv6-first dual-stack
    clusters (on Linux it takes IPv4 too). The probes and the gateway reach the
    pod's IP address, so only these wildcard addresses serve every pod."""
    listen_host: str = DEFAULT_LISTEN_HOST
    """The address the operator's own endpoints listen on (`/metrics` and the
    liveness `/healthz`): `0.0.0.0` (IPv4 only), or `::` for single-stack IPv6
    and IPv6-first dual-stack clusters, where the kubelet's probes and
    Prometheus reach the pod's IPv6 address. On `::` the liveness endpoint takes
    IPv6 only (asyncio's servers set IPV6_V6ONLY), `/metrics` IPv4 too on
    Linux."""
    log_format: LogFormat = LogFormat.JSON
    """`json` for log collectors, `text` for people."""
    verbose: bool = False
    """Debug logging."""
    metrics_port: int = Field(8080, ge=0, le=65535)
    """Port of the Prometheus `/metrics` endpoint; 0 turns it off."""
    health_port: int = Field(8081, ge=0, le=65535)
    """Port of the liveness endpoint `/healthz`; 0 turns it off."""
    peering: PeeringMode = PeeringMode.AUTO
    """Kopf peering mode; see PeeringMode."""
    peering_name: str = "citadel-operator"
    """The (Cluster)KopfPeering object the replicas share."""
    peering_priority: int | None = Field(None, ge=0)
    """This replica's peering priority (the highest works, the others wait); a
    random one per start when absent. Set it for one process only: Kopf pauses
    every replica that sees a live peer of its own priority, so replicas given
    the same one all stand by."""
    peering_lifetime_seconds: int = Field(60, ge=15, le=600)
    """How long a replica's announcement in the peering object holds: when the
    active replica dies without withdrawing it (its node lost), a standby takes
    over after this long. Kopf renews it 5 to 10 s before it runs out, whatever
    the lifetime, and the standbys judge it by their own clocks: clocks further
    apart than that let a standby work beside the active replica, so nodes need
    NTP, and a longer lifetime does not help. At least 15 s, so that a renewal
    is never due at once."""
    nodes_autoscaled: bool = False
    """Nodes join on demand (Cluster Autoscaler, Karpenter): when no node has a
    model's labels or enough GPUs yet, the model waits (Pending) for one instead
    of turning Failed."""
    resync_seconds: float = Field(120.0, ge=0, le=86400, allow_inf_nan=False)
    """How often every model is looked over even without events (owned objects
    that drifted are applied again, see Reconciler._holds); 0 never, otherwise
    10 s to a day."""
    route_publish_delay: float = Field(0.2, ge=0, le=60, allow_inf_nan=False)
    """How long route changes are gathered before the ConfigMap is written (at
    most a minute: a new model is not routed before)."""
    route_publish_interval: float = Field(1.0, ge=0, le=600, allow_inf_nan=False)
    """Least time between two writes of the ConfigMap. Each write carries the
    whole document (322 KB for 1,000 models with 10-character names, namespaces of 3
    and no aliases, adapters, fallbacks or split: 322 bytes a route, read from one
    such route's JSON on 2026-12-08) to the API server and to every gateway's watch;
    while models keep changing, as in a burst of new ones, this bounds how often."""
    pod_monitors: bool = True
    """Make a PodMonitor per model where the PodMonitor CRD is served. False
    makes none and deletes those this operator made (controlled by their
    LLMModel); a PodMonitor of that name it did not make is left alone. The
    chart sets it from `monitoring.enabled`: another Prometheus stack may
    scrape every PodMonitor it finds."""
    pod_monitor_labels: dict[str, str] = {}
    """Labels added to every PodMonitor, as a JSON object: those a Prometheus
    selects PodMonitors by (kube-prometheus-stack's `release`). The operator's
    own labels cannot be replaced."""
    max_concurrent_reconciles: int = Field(32, ge=1)
    """Models reconciled at once, and as many status refreshes beside them; the
    rest wait their turn in arrival order. Without a bound, a burst of new models
    started every reconcile at once against a saturated API server and requests
    timed out waiting for it."""

    gateway_metrics_urls: Annotated[tuple[str, ...], NoDecode] = ()
    """The gateways' `/metrics` URLs the autoscaler reads, comma-separated (or a
    JSON list): for local runs and tests; in a cluster,
    `gateway_metrics_service` finds them."""
    gateway_metrics_service: str = ""
    """`namespace/name` of the Service whose ready endpoints are the gateway
    pods the autoscaler reads (its port named `metrics`, else its first port,
    path `/metrics`); empty reads none."""
    autoscale_interval_seconds: float = Field(2.0, ge=0.2, le=60, allow_inf_nan=False)
    """How often the autoscaler reads the gateways and sizes the models that
    have spec.autoscaling (0.2 to 60)."""
    autoscale_window_seconds: float = Field(30.0, ge=0, le=3600, allow_inf_nan=False)
    """The window whose mean demand sizes a model (0: the latest read alone);
    requests waiting for a replica wake a model at zero at once regardless."""

    @field_validator("gateway_metrics_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as err:
                raise ValueError(f"not a JSON list of URLs: {err}") from None
            return parsed
        return tuple(part.strip() for part in text.split(",") if part.strip())

    @field_validator("gateway_metrics_urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"{url!r} is not an http(s) URL such as "
                    "http://127.0.0.1:8080/metrics"
                )
        return tuple(dict.fromkeys(value))

    @field_validator("gateway_metrics_service")
    @classmethod
    def _service(cls, value: str) -> str:
        if not value:
            return value
        namespace, _, name = value.partition("/")
        if not _LABEL.match(namespace) or not _LABEL.match(name):
            raise ValueError(
                "not namespace/name of a Service, such as "
                "citadel-system/citadel-gateway-metrics"
            )
        return value

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if _LIST_LITERAL.match(text):
            raise ValueError(
                "a JSON or YAML list: write the namespaces comma-separated (llm,team-*)"
            )
        parts = tuple(part.strip() for part in text.split(",") if part.strip())
        if text and not parts:
            # An empty list would watch the whole cluster: only when unset or empty.
            raise ValueError(
                "names no namespace: leave it empty to watch the whole cluster"
            )
        return parts

    @field_validator("watch_namespaces")
    @classmethod
    def _namespaces(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not (_GLOB if _is_glob(pattern) else _LABEL).match(pattern):
                raise ValueError(
                    f"{pattern!r} is neither a namespace name ({_LABEL_RULE}) nor a "
                    "glob of one ('*', '?', '[...]' among those characters)"
                )
        # Listed twice, a namespace would be listed and watched twice.
        return tuple(dict.fromkeys(value))

    @field_validator("gateway_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _LABEL.match(value):
            raise ValueError(f"not a namespace name ({_LABEL_RULE})")
        return value

    @field_validator("routes_configmap", "peering_name")
    @classmethod
    def _object_name(cls, value: str) -> str:
        if not _SUBDOMAIN.match(value):
            raise ValueError(
                f"not an object name (a DNS subdomain: {_LABEL_RULE}, joined by "
                "'.', at most 253 characters)"
            )
        return value

    @field_validator("default_vllm_image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not _IMAGE.match(value):
            raise ValueError(
                "not an image reference such as vllm/vllm-openai:v0.33.0 (a "
                "lowercase repository path, then a tag and/or @sha256:<digest>)"
            )
        return value

    @field_validator("vllm_host", "listen_host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("not an IP address: 0.0.0.0 (IPv4) or :: (IPv6)") from None
        if str(address) not in ("0.0.0.0", "::"):
            # A pod's own address is not known before it starts, the probes and
            # the gateway do not reach the loopback, and a zone (`::%eth0`) would
            # name an interface every node must have.
            raise ValueError(
                "not a wildcard address: 0.0.0.0 (IPv4) or :: (IPv6), so that it "
                "listens on every pod's address"
            )
        return str(address)

    @field_validator("resync_seconds")
    @classmethod
    def _resync(cls, value: float) -> float:
        if 0 < value < MIN_RESYNC_SECONDS:
            raise ValueError(
                f"too short: 0 (never) or {MIN_RESYNC_SECONDS:g} s to a day, since "
                "each period reconciles every model"
            )
        return value

    @field_validator("pod_monitor_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a label key")
            if key in _OWN_LABELS:
                raise ValueError(f"{key!r} is one of the operator's own labels")
            if not _LABEL_VALUE.match(text):
                raise ValueError(f"{text!r} (label {key}) is not a label value")
        return value

    @model_validator(mode="after")
    def _ports_apart(self) -> OperatorSettings:
        if self.metrics_port and self.metrics_port == self.health_port:
            raise ValueError(
                f"{ENV_PREFIX}METRICS_PORT and {ENV_PREFIX}HEALTH_PORT are both "
                f"{self.metrics_port}: give each a port of its own (or 0 to turn "
                "one off)"
            )
        return self

    @property
    def clusterwide(self) -> bool:
        """True when no namespaces are listed."""
        return not self.watch_namespaces

    def list_scopes(self) -> tuple[str | None, ...]:
        """Namespaces to list models in: None (all) when any pattern is a glob."""
        if self.clusterwide or any(_is_glob(n) for n in self.watch_namespaces):
            return (None,)
        return self.watch_namespaces

    def watches(self, namespace: str) -> bool:
        """True when `namespace` is one the operator handles."""
        return self.clusterwide or any(
            fnmatch.fnmatchcase(namespace, p) for p in self.watch_namespaces
        )


def explain(error: ValidationError) -> str:
    """What is wrong with the environment, one line per problem, each naming the
    variable (`CITADEL_OPERATOR_RESYNC_SECONDS='inf': ...`).

    Args:
        error: what OperatorSettings() raised.
    """
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        field, *inner = problem["loc"] or ("",)
        if field:
            # The input of a problem inside a value (a label of
            # POD_MONITOR_LABELS) is that part of it.
            where = f" at {'.'.join(map(str, inner))}" if inner else ""
            variable = f"{ENV_PREFIX}{str(field).upper()}"
            lines.append(f"{variable}{where}={problem['input']!r}: {message}")
        else:
            lines.append(message)
    return "\n".join(lines)


_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
# A DNS subdomain: dot-separated DNS labels, 253 characters at most.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_KEY = re.compile(rf"^((?=.{{1,253}}/){_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
# Namespaces are DNS labels; object names such as a ConfigMap's DNS subdomains.
_LABEL = re.compile(rf"^{_DNS_LABEL}$")
_LABEL_RULE = (
    "lowercase letters, digits and '-', beginning and ending with a letter or "
    "digit, at most 63 characters"
)
_SUBDOMAIN = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*$")
# The patterns fnmatch understands, over the characters of a namespace name;
# Kopf's `!` exclusions are not supported (watches() would not apply them).
_GLOB = re.compile(r"^([-a-z0-9*?]|\[!?[-a-z0-9]+\])+$")
# `[llm]` or `["llm", "x"]`: a list where a comma-separated string belongs.
_LIST_LITERAL = re.compile(r"^\[[^\[\]]*\]$")
with warnings.catch_warnings():
    # `[[]` is the bracket itself, as RE2 reads it (spec.IMAGE_PATTERN is a CEL
    # rule's too); `re` reads it so as well, and only warns that it might not
    # one day.
    warnings.filterwarnings("ignore", "Possible nested set", FutureWarning)
    _IMAGE = re.compile(IMAGE_PATTERN)
_OWN_LABELS = frozenset(
    {
        names.LABEL_NAME,
        names.LABEL_INSTANCE,
        names.LABEL_COMPONENT,
        names.LABEL_PART_OF,
        names.LABEL_MANAGED_BY,
        names.LABEL_MODEL,
    }
)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")
