"""The composition root: picks each part's implementation from the settings."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis

from citadel.gateway.deps import Deps
from citadel.gateway.kube.client import KubeClient
from citadel.gateway.kube.config import KubeConfig, in_cluster, load_kubeconfig
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.services.auth import Authenticator, InMemoryKeyStore
from citadel.gateway.services.buckets import BucketStore, InProcessBuckets
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.limits import Limiter
from citadel.gateway.services.placements import (
    Placement,
    PlacementExchange,
    channel_name,
)
from citadel.gateway.services.proxy import ProxyOptions, ProxyService
from citadel.gateway.services.redis_buckets import RedisBuckets, redis_client
from citadel.gateway.services.replicas import EjectionPolicy
from citadel.gateway.services.routing import Router
from citadel.gateway.services.scraper import MetricsScraper, report_max_age_s
from citadel.gateway.services.shedding import SheddingSettings
from citadel.gateway.services.sockets import SocketCounts
from citadel.gateway.settings import AuthMode, GatewaySettings, RoutesSource
from citadel.gateway.sources.files import keys_file_source, routes_file_source
from citadel.gateway.sources.kubernetes import KeySecretsSource, RoutesWatchSource
from citadel.gateway.upstream import UpstreamClient, UpstreamSettings


class StartupError(ValueError):
    """The settings lack what the gateway needs to start (a routes or keys
    file outside Kubernetes): the message says which to set."""


def kube_config(settings: GatewaySettings, environ: Mapping[str, str]) -> KubeConfig:
    """The kubeconfig file when one is set, else the in-cluster service account."""
    if settings.kubeconfig is not None:
        return load_kubeconfig(settings.kubeconfig, settings.kube_context)
    return in_cluster(environ)


def build_deps(settings: GatewaySettings, environ: Mapping[str, str]) -> Deps:
    """Every part of the gateway, wired as the settings say.

    Args:
        settings: the typed settings.
        environ: the process environment (only for the in-cluster API address).
    """
    metrics = GatewayMetrics(max_key_labels=settings.max_key_labels)
    catalog = Catalog(metrics.reloaded)
    keys = InMemoryKeyStore()
    upstream = UpstreamClient(
        UpstreamSettings(settings.connect_timeout_s, settings.read_timeout_s)
    )

    def decided(model: str, strategy: str, how: str) -> None:
        metrics.routing_decisions.labels(model, strategy, how).inc()

    load_max_age_s = report_max_age_s(settings.metrics_scrape_period_s)
    # One client, one pool of connections, for the limits and the placements.
    redis = (
        redis_client(settings.redis_url, settings.redis_timeout_s)
        if settings.redis_url
        else None
    )
    exchange: PlacementExchange | None = None
    on_placed: Callable[[Placement], None] | None = None
    if redis is not None and settings.share_placements:
        exchange = _placement_exchange(settings, redis, metrics)
        on_placed = exchange.offer
    router = Router(
        catalog,
        time.monotonic,
        decided,
        load_max_age_s=load_max_age_s,
        on_placed=on_placed,
    )
    if exchange is not None:
        exchange.learn = router.learn
    store: BucketStore = InProcessBuckets()
    shutdown: list[Callable[[], Awaitable[None]]] = []
    if redis is not None:
        store = RedisBuckets(redis)
        shutdown.append(redis.aclose)
    limiter = Limiter(store, time.time)
    deps = Deps(
        catalog=catalog,
        authenticator=Authenticator(keys, settings.auth is AuthMode.REQUIRED),
        proxy=ProxyService(
            catalog, router, limiter, upstream, metrics, proxy_options(settings)
        ),
        metrics=metrics,
        startup=[upstream.start],
        shutdown=[upstream.close, *shutdown],
        session_header=settings.session_header,
        max_body_bytes=settings.max_body_bytes,
        load_max_age_s=load_max_age_s,
        sockets=SocketCounts(settings.max_sockets_per_key),
    )
    deps.sources.append(
        MetricsScraper(
            catalog,
            upstream,
            settings.metrics_scrape_period_s,
            time.monotonic,
            watched=deps.proxy.shedding_watched,
        )
    )
    if exchange is not None:
        deps.sources.append(exchange)
    _add_sources(settings, environ, deps, keys)
    return deps


class _PlacementMetrics:
    """`PlacementCounts` as the gateway's metrics."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def published(self, count: int) -> None:
        self._metrics.placements_shared.labels("published").inc(count)

    def learned(self, count: int) -> None:
        self._metrics.placements_shared.labels("learned").inc(count)

    def dropped(self, reason: str, count: int) -> None:
        self._metrics.placements_dropped.labels(reason).inc(count)


def _placement_exchange(
    settings: GatewaySettings, client: aioredis.Redis, metrics: GatewayMetrics
) -> PlacementExchange:
    """The exchange of placements on `client` (`share_placements`); its
    `learn` is set once the router exists."""
    channel = settings.placements_channel or channel_name(
        settings.routes_namespace or settings.namespace
    )
    return PlacementExchange(
        client,
        channel,
        counts=_PlacementMetrics(metrics),
        flush_s=settings.placements_flush_s,
    )


def proxy_options(settings: GatewaySettings) -> ProxyOptions:
    """How hard the proxy tries, as the settings say."""
    return ProxyOptions(
        retries=settings.retries,
        default_max_tokens=settings.default_max_tokens,
        # One read timeout for all of a request's tries, not one each.
        answer_within_s=settings.read_timeout_s,
        # A retry may connect for as long as the first try could, unless that
        # leaves it no room: the first try's failure, however quick (a refused
        # connection), uses some of the read timeout, so a floor at the read
        # timeout or near it (one of 1 s with a connect timeout of 2 s, both
        # valid settings) would let no retry ever start. At most half of it, a
        # retry there may have its connection cut short by the deadline.
        least_try_s=min(settings.connect_timeout_s, settings.read_timeout_s / 2),
        connect_within_s=settings.connect_timeout_s,
        scale_from_zero_within_s=settings.scale_from_zero_timeout_s,
        queue_within_s=settings.queue_timeout_s,
        shedding=SheddingSettings(
            queue_depth=settings.shed_queue_depth,
            kv_cache_usage=settings.shed_kv_cache_usage,
            scrape_period_s=settings.metrics_scrape_period_s,
        ),
        ejection=EjectionPolicy(
            settings.eject_after_failures, settings.eject_base_s, settings.eject_max_s
        ),
    )


def _add_sources(
    settings: GatewaySettings,
    environ: Mapping[str, str],
    deps: Deps,
    keys: InMemoryKeyStore,
) -> None:
    period = settings.file_poll_period_s
    use_kube = settings.routes_source is RoutesSource.KUBERNETES
    kube_keys = settings.keys_file is None and use_kube
    client = KubeClient(kube_config(settings, environ)) if use_kube else None
    if client is not None:
        deps.startup.append(client.start)
        deps.shutdown.append(client.close)
        routes_namespace = settings.routes_namespace or settings.namespace
        deps.sources.append(
            RoutesWatchSource(client, routes_namespace, deps.catalog, deps.metrics)
        )
    elif settings.routes_file is not None:
        deps.sources.append(
            routes_file_source(settings.routes_file, deps.catalog, period)
        )
    else:
        raise StartupError(
            "CITADEL_GATEWAY_ROUTES_FILE is required with "
            "CITADEL_GATEWAY_ROUTES_SOURCE=file"
        )
    if settings.auth is AuthMode.DISABLED:
        return
    if kube_keys and client is not None:
        deps.sources.append(
            KeySecretsSource(client, settings.namespace, keys, deps.metrics)
        )
    elif settings.keys_file is not None:
        deps.sources.append(keys_file_source(settings.keys_file, keys, period))
    else:
        raise StartupError(
            "CITADEL_GATEWAY_KEYS_FILE is required outside Kubernetes unless "
            "CITADEL_GATEWAY_AUTH=disabled"
        )
