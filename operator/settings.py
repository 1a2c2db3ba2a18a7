"""The operator's configuration, read once from the environment at start-up."""

from __future__ import annotations

import enum
import fnmatch
import re
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from citadel.operator import names

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"


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
        env_prefix="CITADEL_OPERATOR_", frozen=True, use_attribute_docstrings=True
    )

    watch_namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    """Namespaces to watch, comma-separated, globs allowed (`team-*`); empty
    watches the whole cluster."""
    gateway_namespace: str = "citadel-system"
    """Where the routing ConfigMap is kept (the gateway's namespace)."""
    routes_configmap: str = "citadel-routes"
    """The routing ConfigMap's name."""
    default_vllm_image: str = DEFAULT_VLLM_IMAGE
    """The vLLM image for models that do not name one (a pinned tag)."""
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
    random one per start when absent, so two replicas never tie."""
    nodes_autoscaled: bool = False
    """Nodes join on demand (Cluster Autoscaler, Karpenter): when no node has a
    model's labels or enough GPUs yet, the model waits (Pending) for one instead
    of turning Failed."""
    resync_seconds: float = Field(120.0, ge=0)
    """How often every model is looked over even without events (owned objects
    that drifted are applied again, see Reconciler._holds); 0 never."""
    route_publish_delay: float = Field(0.2, ge=0)
    """How long route changes are gathered before the ConfigMap is written."""
    route_publish_interval: float = Field(1.0, ge=0)
    """Least time between two writes of the ConfigMap. Each write carries the
    whole document (282 KB for 1,000 models with 10-character names and no
    aliases, measured with build_document) to the API server and to every
    gateway's watch; while models keep changing, as in a burst of new ones, this
    bounds how often."""
    pod_monitor_labels: dict[str, str] = {}
    """Labels added to every PodMonitor, as a JSON object: those a Prometheus
    selects PodMonitors by (kube-prometheus-stack's `release`). The operator's
    own labels cannot be replaced."""
    max_concurrent_reconciles: int = Field(32, ge=1)
    """Models reconciled at once, and as many status refreshes beside them; the
    rest wait their turn in arrival order. Without a bound, a burst of new models
    started every reconcile at once against a saturated API server and requests
    timed out waiting for it."""

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
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


_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
# A DNS subdomain: dot-separated DNS labels, 253 characters at most.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_KEY = re.compile(rf"^((?=.{{1,253}}/){_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
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
