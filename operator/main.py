"""`citadel-operator`: the operator's entry point.

The only place that reads the environment: settings are loaded here once and passed
down.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import random
from collections.abc import Callable

import kopf
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import ValidationError
from pydantic_settings import SettingsError

from citadel.operator import __version__
from citadel.operator.handlers import build_registry
from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import AioKube, Login
from citadel.operator.kube.heed import AskedWait
from citadel.operator.metrics import Metrics
from citadel.operator.names import KOPF_PREFIX, MANAGED_SELECTOR
from citadel.operator.reconcile import RETRY_AFTER_MAX_S, Reconciler
from citadel.operator.settings import (
    LogFormat,
    OperatorSettings,
    PeeringMode,
    explain,
)

# The cyclic garbage collector's thresholds (see `tune_collector`): Python's
# own for the young generations, a full collection after 100 older ones
# instead of 10.
GC_THRESHOLDS = (700, 10, 100)


def tune_collector() -> None:
    """Makes full collections of the cyclic garbage collector rare, and leaves
    what start-up built out of them.

    Each watch event is a tree of a few hundred dicts and lists (a pod or a
    Deployment is about 7 KB of JSON), and Kopf keeps the latest copy of each
    object in its indexes until the next event replaces it. Those a young
    collection finds alive are promoted, and with Python's thresholds
    (700, 10, 10) enough were that a full collection, which walks every
    object of the process, came every few seconds. In the burst of 1,000
    models (bench/citadel_bench/operator_scale.py; the collector's CPU time
    taken with gc.callbacks and time.thread_time) it took 8.1-9.0 of the
    operator's 33.3-37.1 CPU seconds, 18-19 full collections about 6 s of
    them (three runs); with these thresholds 3.3-3.6 of 29.1-31.9, 4 full
    collections 1.1 s (two runs, interleaved with those), for an RSS peak of
    292 MiB instead of 268-271. Young collections are left as they are: at
    50,000 (one run) the collector took 2.5 s but the rest of the operator
    7.7 s more than the runs beside it, the reference cycles Kopf leaves
    behind each event lingering longer.

    What start-up built (modules, Kopf's registry, pydantic's validators)
    lives as long as the process: frozen, full collections skip it (as the
    gateway's main does). Garbage is collected first: frozen, it would never be
    freed.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def kopf_settings(
    settings: OperatorSettings, state: MemoryState, default_priority: int = 0
) -> kopf.OperatorSettings:
    """Kopf's settings: handling state in memory, server-side label selectors,
    quiet handler events, peering.

    Args:
        settings: the operator's settings.
        state: where Kopf keeps what it handled (see kopfstate.py).
        default_priority: the peering priority when the settings give none.
    """
    ks = kopf.OperatorSettings()
    ks.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    ks.persistence.progress_storage = state.progress
    ks.persistence.diffbase_storage = state.diffbase
    # Only our own pods, Deployments and Services are sent: the handlers' label
    # filters run in the operator, after the API server has sent, and Kopf
    # decoded and processed, every one of the cluster (or watched namespaces).
    ks.watching.label_selectors["", "v1", "pods"] = MANAGED_SELECTOR
    ks.watching.label_selectors["apps", "v1", "deployments"] = MANAGED_SELECTOR
    ks.watching.label_selectors["", "v1", "services"] = MANAGED_SELECTOR
    # Our own Events describe the model; Kopf's per-handler ones only when failing.
    ks.posting.level = logging.WARNING
    ks.peering.name = settings.peering_name
    ks.peering.mandatory = settings.peering is PeeringMode.MANDATORY
    ks.peering.standalone = settings.peering is PeeringMode.STANDALONE
    ks.peering.clusterwide = settings.clusterwide
    ks.peering.lifetime = settings.peering_lifetime_seconds
    # Replicas of equal priority all pause (Kopf 1.45 pauses every replica that
    # sees a live peer of its own priority): hence a random one per start.
    ks.peering.priority = (
        settings.peering_priority
        if settings.peering_priority is not None
        else default_priority
    )
    return ks


def liveness_endpoint(settings: OperatorSettings) -> str | None:
    """The URL Kopf serves `/healthz` at, on `listen_host`; None when off.

    Kopf reads the address to listen on from the URL's host, where an IPv6 one
    goes in brackets (`http://[::]:8081/healthz`).
    """
    if not settings.health_port:
        return None
    host = settings.listen_host
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    return f"http://{host}:{settings.health_port}/healthz"


def serve_metrics(
    settings: OperatorSettings, registry: CollectorRegistry
) -> Callable[[], None]:
    """Serves `/metrics` on `listen_host` and `metrics_port`, if set, from a
    thread of its own (prometheus_client's server); returns what stops it."""
    if not settings.metrics_port:
        return lambda: None
    server, _ = start_http_server(
        settings.metrics_port, addr=settings.listen_host, registry=registry
    )

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


def login_function(ks: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In-cluster service account first, then KUBECONFIG or ~/.kube/config.

    Raises:
        kopf.LoginError: neither is available.
    """
    info = kopf.login_with_service_account(settings=ks) or kopf.login_with_kubeconfig(
        settings=ks
    )
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig to log in with")
    return info


def connect(
    login: Login, settings: OperatorSettings, metrics: Metrics
) -> tuple[AioKube, Reconciler]:
    """The API client, and the reconciler that works through it.

    They share one `AskedWait`: the client tells it every refusal, whichever
    request got it, and the reconciler's periodic passes and refreshes send
    nothing for as long as the latest Retry-After asked.

    Args:
        login: returns fresh credentials.
        settings: the operator's settings.
        metrics: where the reconciler reports.
    """
    asked_wait = AskedWait(RETRY_AFTER_MAX_S)
    kube = AioKube(login, on_refusal=asked_wait.heed)
    return kube, Reconciler(kube, settings, metrics, asked_wait=asked_wait)


def main(argv: list[str] | None = None) -> int:
    """Runs the operator until it is stopped (SIGINT/SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="citadel-operator",
        description="Reconciles LLMModel resources into vLLM Deployments. Settings "
        "come from CITADEL_OPERATOR_* variables (docs/concepts.md).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    try:
        settings = OperatorSettings()
    except ValidationError as error:
        parser.exit(2, f"citadel-operator: invalid settings\n{explain(error)}\n")
    except SettingsError as error:
        # A value that is not JSON where JSON is expected (POD_MONITOR_LABELS).
        parser.exit(2, f"citadel-operator: invalid settings\n{error}\n")
    kopf.configure(
        verbose=settings.verbose,
        log_format=kopf.LogFormat.JSON
        if settings.log_format is LogFormat.JSON
        else kopf.LogFormat.FULL,
    )
    if not settings.verbose:
        # Kopf logs every handler call at INFO, one line per pod event; our own
        # lines say what each reconcile did.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    state = MemoryState()
    ks = kopf_settings(settings, state, default_priority=random.randint(1, 1_000_000))
    # A paused peer's per-model reports go stale after two resync periods
    # (ModelSeries): under CitadelModelFailed's 5 minutes with the default 120 s.
    # Without resyncs nothing renews them, so they never do.
    metrics = Metrics(stale_after_s=2 * settings.resync_seconds or None)
    serve_metrics(settings, metrics.registry)

    def login() -> kopf.ConnectionInfo:
        return login_function(ks)

    kube, reconciler = connect(login, settings, metrics)
    registry = build_registry(reconciler, settings, login, kube.close, state)
    tune_collector()
    kopf.run(
        registry=registry,
        settings=ks,
        clusterwide=settings.clusterwide,
        namespaces=settings.watch_namespaces,
        # Peering comes from `ks` alone: kopf.run's peering_name would make it
        # mandatory whatever the mode says.
        liveness_endpoint=liveness_endpoint(settings),
    )
    return 0
