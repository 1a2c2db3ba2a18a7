"""Every metric the gateway exports: names, label keys and buckets in one place.

Labels are bounded: model names come from the routing document, key names from the
key store (capped by `max_key_labels`, the rest counted as `other`), replica
addresses from discovery, watched resources from the few kinds the sources watch
(never a namespace or an object's name). Keys themselves never appear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "citadel_gateway_"

LABEL_MODEL = "model"
LABEL_STATUS = "status"
LABEL_KEY = "key"
LABEL_REPLICA = "replica"
LABEL_STRATEGY = "strategy"
LABEL_KIND = "kind"
# The API a request called (chat, completions, ...). Not `endpoint`: the Prometheus
# Operator sets that target label (the scrape port's name) on every series, and a
# scraped `endpoint` would be renamed `exported_endpoint`.
LABEL_API = "api"
LABEL_SCOPE = "scope"
LABEL_DOOR = "door"
LABEL_CODE = "code"
# The kind of object a Kubernetes watch keeps (routes, endpointslices, secrets).
LABEL_RESOURCE = "resource"
LABEL_DIRECTION = "direction"
LABEL_REASON = "reason"
# The model a fallback name routes to, as its route lists it.
LABEL_FALLBACK = "fallback"
# The model a split sends a share of a model's requests to, as its route lists it.
LABEL_TARGET = "target"
# A request's priority (standard or sheddable: services.auth.Priority).
LABEL_PRIORITY = "priority"
# A model's route identity (its LLMModel's namespace and name) and what its
# requests are doing, on `model_requests`: the operator's autoscaler reads it
# straight from each gateway, so these names are its contract. `model_namespace`
# as the operator's own metrics name it: Prometheus renames a scraped
# `namespace` label to `exported_namespace`.
LABEL_NAMESPACE = "model_namespace"
LABEL_LLMMODEL = "llmmodel"
LABEL_STATE = "state"
MODEL_REQUESTS = PREFIX + "model_requests"
STATE_IN_FLIGHT = "in_flight"
STATE_WAITING = "waiting"
STATE_QUEUED = "queued"
MODEL_REQUEST_STATES = (STATE_IN_FLIGHT, STATE_WAITING, STATE_QUEUED)
# Why a request left a model for its fallback (`fallbacks`' reason label).
FALLBACK_NO_REPLICA = "no_replica"
FALLBACK_BUSY = "busy"
FALLBACK_WAKING = "waking"

OTHER_KEY = "other"
ANONYMOUS_KEY = "anonymous"
UNKNOWN_MODEL = "unknown"

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COST_BUCKETS = (0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)


ModelIdentity = tuple[str, str]
"""A model's route identity: its LLMModel's (namespace, name)."""


class ModelDemand(Collector):
    """`citadel_gateway_model_requests{model_namespace,llmmodel,state}`: each model's
    requests in flight at its replicas and waiting for one, by route identity
    (every name of the model, its adapters' too, counted together).

    A custom collector rather than a labelled Gauge: each routed model has its
    in_flight and waiting series at 0 from when its route is in force, and
    queued too where its route bounds the requests per replica, read from the
    routes at each scrape, and they go with the route (a labelled Gauge would
    hold a child per model and state, 80,000 of them at 40,000 models, each to
    be removed by hand). A model whose route went while requests were counted
    keeps its series until they end; a count not 0 is always exported.

    The counts change on the event loop and are read by the metrics port's
    thread: a scrape reads a copy (one step under the GIL).
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._routed: Callable[[], Iterable[tuple[ModelIdentity, bool]]] = tuple

    def follow(
        self, routed: Callable[[], Iterable[tuple[ModelIdentity, bool]]]
    ) -> None:
        """Exports in_flight and waiting for each model `routed()` names at a
        scrape (the routing document in force), and queued for those it says
        are bounded (their route has maxRequestsPerReplica: at 40,000 routes a
        third series for each took the family from 7.8 to 11.7 MB, which the
        operator's autoscaler reads at each tick)."""
        self._routed = routed

    def add(self, model: ModelIdentity, state: str, delta: int) -> None:
        """Counts `delta` more (or fewer) requests of `model` in `state`
        (one of `MODEL_REQUEST_STATES`)."""
        key = (*model, state)
        count = self._counts.get(key, 0) + delta
        if count:
            self._counts[key] = count
        else:
            del self._counts[key]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The family without samples (registering reads no routes)."""
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """A sample for each state of each model routed or still counted (see
        `follow`)."""
        counts = self._counts.copy()
        family = self._family()
        models = dict(self._routed())
        for key in counts:
            models.setdefault((key[0], key[1]), False)
        for (namespace, name), bounded in models.items():
            for state in MODEL_REQUEST_STATES:
                value = counts.get((namespace, name, state), 0)
                if value or bounded or state != STATE_QUEUED:
                    family.add_metric([namespace, name, state], value)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            MODEL_REQUESTS,
            "Requests of each LLMModel (any of its names: served name, alias, "
            "adapter) by state: in_flight (sent to one of its replicas and not "
            "finished; a stream until it ends), waiting (held for a replica of "
            "a model at zero, scaleFromZero) or queued (waiting for a replica "
            "with room, maxRequestsPerReplica). Read by the operator's "
            "autoscaler.",
            labels=[LABEL_NAMESPACE, LABEL_LLMMODEL, LABEL_STATE],
        )


class GatewayMetrics:
    """The gateway's instruments, registered in their own registry.

    Args:
        registry: where they are registered (one per app, so tests never share).
        max_key_labels: distinct key names kept as labels before `other`.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, max_key_labels: int = 100
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._max_keys = max_key_labels
        self._keys: set[str] = set()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Requests answered, by model, HTTP status, key name and door (rest, "
            "grpc, graphql); refused before the body is read: model `unknown`.",
            [LABEL_API, LABEL_MODEL, LABEL_STATUS, LABEL_KEY, LABEL_DOOR],
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request to the last byte of the response.",
            [LABEL_API, LABEL_MODEL],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request to the first streamed chunk sent to the client.",
            [LABEL_MODEL],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.headers_too_large = Counter(
            PREFIX + "headers_too_large",
            "Requests refused (431, connection closed) before the app saw them: "
            "request line and headers over the bound, or never ending past it.",
            registry=r,
        )
        # Apart from `headers_too_large`, not a label of it: that series (and
        # what reads it) predates this one, and a label would rename it.
        self.head_timeouts = Counter(
            PREFIX + "head_timeouts",
            "Requests refused (408, connection closed) before the app saw them: "
            "request line and headers not complete within the head timeout of "
            "their first byte.",
            registry=r,
        )
        self.tokens = Counter(
            PREFIX + "tokens",
            "Tokens used, by model, key name and kind (prompt or completion).",
            [LABEL_MODEL, LABEL_KEY, LABEL_KIND],
            registry=r,
        )
        self.rate_limited = Counter(
            PREFIX + "rate_limited",
            "Requests refused by a limit, by scope (requests, tokens, quota).",
            [LABEL_MODEL, LABEL_KEY, LABEL_SCOPE],
            registry=r,
        )
        # Apart from `requests`: a code label there would multiply its series
        # by every code, while only these few streams need one.
        self.stream_errors = Counter(
            PREFIX + "stream_errors",
            "REST streams that failed after their 200 went out (counted as 200 in "
            "requests_total), by code: stream_broken (the replica's stream broke "
            "off or went silent), backend_error (the model server's error event), "
            "shutting_down (cut at the end of the gateway's shutdown grace).",
            [LABEL_API, LABEL_MODEL, LABEL_CODE],
            registry=r,
        )
        self.backend_errors = Counter(
            PREFIX + "backend_errors",
            "Failures talking to a replica, by kind (connect, dropped, timeout, "
            "protocol).",
            [LABEL_MODEL, LABEL_REPLICA, LABEL_KIND],
            registry=r,
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight_requests",
            "Requests outstanding at each replica from this gateway.",
            [LABEL_MODEL, LABEL_REPLICA],
            registry=r,
        )
        self.model_requests = ModelDemand()
        r.register(self.model_requests)
        self.routing_decisions = Counter(
            PREFIX + "routing_decisions",
            "Replica choices, by strategy and how the choice was made.",
            [LABEL_MODEL, LABEL_STRATEGY, LABEL_KIND],
            registry=r,
        )
        self.placements_shared = Counter(
            PREFIX + "placements_shared",
            "Prefix-aware placements shared with the other gateway replicas "
            "through Redis, by direction: published (this gateway's) or learned "
            "(another's, recorded here).",
            [LABEL_DIRECTION],
            registry=r,
        )
        self.placements_dropped = Counter(
            PREFIX + "placements_dropped",
            "Placements not shared, by reason: outbox (more waiting than the "
            "outbox holds), redis (waiting to be published when Redis "
            "failed), unknown (another "
            "gateway's, for a model or replica this one does not route to), "
            "malformed (a message on the channel not the gateway's).",
            [LABEL_REASON],
            registry=r,
        )
        self.fallbacks = Counter(
            PREFIX + "fallbacks",
            "Requests the gateway turned to a fallback model for, then tried it, "
            "by the model asked for, the fallback tried (as its route lists it) "
            "and why the model before it could not answer: no_replica (none "
            "ready, reachable or serving it), busy (every replica answered 429), "
            "waking (it scales from zero and had no ready replica).",
            [LABEL_MODEL, LABEL_FALLBACK, LABEL_REASON],
            registry=r,
        )
        self.splits = Counter(
            PREFIX + "splits",
            "Requests for a model that its split (spec.routing.split) sent to "
            "another model, by the model asked for (its served name) and the "
            "target (as the split lists it); each is then counted under the "
            "target's model. A target skipped (unknown, not allowed to the key, "
            "no ready replica) takes none: the model asked for serves them.",
            [LABEL_MODEL, LABEL_TARGET],
            registry=r,
        )
        self.shed = Counter(
            PREFIX + "shed",
            "Sheddable requests refused (503 model_overloaded) because every "
            "replica of their model was full, by model (the one they would have "
            "been served by, after a split) and key name; counted in requests "
            "too, with status 503.",
            [LABEL_MODEL, LABEL_KEY],
            registry=r,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time requests waited at the gateway for a replica with room, by "
            "model and priority: those of a model with maxRequestsPerReplica "
            "that found every replica at it (served in their turn, or refused "
            "with 503 model_overloaded once the queue timeout passed). "
            "Requests served at once are not observed.",
            [LABEL_MODEL, LABEL_PRIORITY],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.ejections = Counter(
            PREFIX + "replica_ejections",
            "Times a replica was taken out of rotation after failures.",
            [LABEL_MODEL, LABEL_REPLICA],
            registry=r,
        )
        self.cost = Histogram(
            PREFIX + "request_cost",
            "Cost of each request in the routing document's currency, when priced.",
            [LABEL_MODEL, LABEL_KEY],
            buckets=COST_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            PREFIX + "config_reloads",
            "Routing documents offered, by result: ok; partial (some routes left "
            "out or read differently); invalid (refused, the last good one stays); "
            "missing (its ConfigMap deleted, the last good one stays).",
            [LABEL_STATUS],
            registry=r,
        )
        # A document is offered once per change, so the alert needs a state to
        # hold, not a count that stops growing.
        self.config_last_reload_ok = Gauge(
            PREFIX + "config_last_reload_successful",
            "1 when the last routing document offered was used in full (or none "
            "was offered yet); 0 when it was refused or partly left out, or its "
            "ConfigMap deleted.",
            registry=r,
        )
        self.config_last_reload_ok.set(1)
        self.watch_failures = Counter(
            PREFIX + "watch_failures",
            "Kubernetes lists and watches that failed, by the resource watched "
            "(routes, endpointslices, secrets): refused, unanswered or answered "
            "in a shape the API does not define, a list or event the gateway "
            "could not take, or a watch that ended by an error.",
            [LABEL_RESOURCE],
            registry=r,
        )
        # A failing watch retries for ever and logs each time, but a count
        # cannot say it has not recovered since: the alert needs a state.
        self.watches_synced = Gauge(
            PREFIX + "watch_synced",
            "1 while every watch of the resource is in sync; 0 from a watch's "
            "start until its first list, and from a failure until a list or an "
            "event comes again: the gateway works on a view that may be stale.",
            [LABEL_RESOURCE],
            registry=r,
        )
        # Resource -> its watches not in sync (one per namespace for
        # endpointslices): the gauge is 1 only when none is left.
        self._unsynced: dict[str, set[str]] = {}

    def reloaded(self, result: str) -> None:
        """Counts one routing document offered (ok, partial or invalid), or
        its source gone (missing)."""
        self.config_reloads.labels(result).inc()
        self.config_last_reload_ok.set(1 if result == "ok" else 0)

    def watch_started(self, resource: str, watch: str) -> None:
        """A watch of `resource` starts, not in sync until its first list.

        Args:
            resource: the kind watched, the label.
            watch: which watch of that kind (a namespace); never a label.
        """
        self.watch_failures.labels(resource)  # 0 from the start, for rate()
        self._watch_state(resource, watch, synced=False)

    def watch_synced(self, resource: str, watch: str) -> None:
        """A watch listed, or delivered again after a failure."""
        self._watch_state(resource, watch, synced=True)

    def watch_failed(self, resource: str, watch: str) -> None:
        """A watch's list or watch failed (counted); its view may go stale."""
        self.watch_failures.labels(resource).inc()
        self._watch_state(resource, watch, synced=False)

    def watch_stopped(self, resource: str, watch: str) -> None:
        """A watch no longer needed (its namespace no longer routed) is
        forgotten: it holds the gauge down no more."""
        self._watch_state(resource, watch, synced=True)

    def _watch_state(self, resource: str, watch: str, synced: bool) -> None:
        unsynced = self._unsynced.setdefault(resource, set())
        if synced:
            unsynced.discard(watch)
        else:
            unsynced.add(watch)
        self.watches_synced.labels(resource).set(0 if unsynced else 1)

    def key_label(self, key_name: str | None) -> str:
        """A bounded label for a key name."""
        if key_name is None:
            return ANONYMOUS_KEY
        if key_name in self._keys:
            return key_name
        if len(self._keys) < self._max_keys:
            self._keys.add(key_name)
            return key_name
        return OTHER_KEY
