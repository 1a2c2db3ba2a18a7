"""Kopf handlers: thin adapters from watch events to the Reconciler.

`build_registry` registers them on a fresh registry (no import-time side effects),
closing over the Reconciler that `main` built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import kopf

from citadel.operator import names
from citadel.operator.autoscaler import Autoscaler
from citadel.operator.background import Background
from citadel.operator.gateways import Gateways
from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import ApiError
from citadel.operator.reconcile import (
    ReconcileError,
    Reconciler,
    owner_uid,
    service_drifted,
)
from citadel.operator.settings import OperatorSettings, PeeringMode
from citadel.operator.sweep import IndexSweep
from citadel.operator.view import (
    DEPLOYMENTS_INDEX,
    MODELS_INDEX,
    NODES_INDEX,
    PODS_INDEX,
    IndexedView,
)

log = logging.getLogger(__name__)
LLMMODEL = (names.GROUP, names.VERSION, names.PLURAL)
MANAGED = {names.LABEL_MANAGED_BY: names.MANAGER_NAME}


async def _translated(work: Coroutine[Any, Any, object]) -> None:
    """Runs a reconcile, mapping its errors to Kopf's retry semantics."""
    try:
        await work
    except ReconcileError as err:
        if err.retryable:
            raise kopf.TemporaryError(str(err), delay=err.delay) from err
        raise kopf.PermanentError(str(err)) from err


def _without_finalizers(registry: kopf.OperatorRegistry) -> None:
    """Stops Kopf from putting a finalizer on every model for the timer, and on
    the peering object for its daemon.

    Kopf marks every timer and daemon as needing one, to stop it gracefully
    before the object goes; neither needs such care, and with a finalizer,
    deleting a model (or its namespace, or the peering object) would hang
    whenever no operator runs. Kopf has no option for this, hence the
    replacement of its (frozen) handler records.
    """
    spawning = registry._spawning
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) for h in spawning._handlers
    ]


def _peering_resource(settings: OperatorSettings) -> tuple[str, str, str]:
    """The group, version and plural of the replicas' peering object: Kopf
    peers cluster-wide through a ClusterKopfPeering, else through a KopfPeering
    in each watched namespace."""
    plural = "clusterkopfpeerings" if settings.clusterwide else "kopfpeerings"
    return ("kopf.dev", "v1", plural)


async def _sense_pauses(reconciler: Reconciler, stopped: kopf.DaemonStopped) -> None:
    """Tells the reconciler when Kopf pauses this replica for a peer, and when
    it resumes: the body of a Kopf daemon on the peering object.

    Kopf has no hook for either, and stops only its own watches, handlers and
    daemons, not the tasks they set off (see `Reconciler.pause`). But it stops
    every daemon when it pauses, saying so (`OPERATOR_PAUSING`), and starts
    them again from the listing that follows the resume: a running daemon
    means an active replica. A replica that starts paused (a peer of higher
    priority is active) runs no daemon and no handler until it resumes, and
    its publisher waits for the first handler (`RoutePublisher.hold`).
    """
    reconciler.resume()
    await stopped.wait()
    if stopped.reason is not None and (
        kopf.DaemonStoppingReason.OPERATOR_PAUSING in stopped.reason
    ):
        reconciler.pause()


def _kept(body: kopf.Body) -> dict[str, Any]:
    """What an index keeps of an object: all but `metadata.managedFields`.

    Nothing in the operator reads the field-ownership records from an index,
    which holds one object per model, Deployment, pod and node for as long as
    they live. Dropping them took the operator's RSS peak/end at 1,000 models
    from 336/338 MiB (make bench at 36d70e5) to 291/293 MiB (at b68cf22).
    """
    kept = dict(body)
    metadata = kept.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        kept["metadata"] = {k: v for k, v in metadata.items() if k != "managedFields"}
    return kept


def build_registry(
    reconciler: Reconciler,
    settings: OperatorSettings,
    login: Callable[[], kopf.ConnectionInfo],
    on_cleanup: Callable[[], Awaitable[None]],
    state: MemoryState,
) -> kopf.OperatorRegistry:
    """Registers every handler of the operator.

    Args:
        reconciler: does the work.
        settings: the operator's settings (the resync interval).
        login: credentials for Kopf's own API connection.
        on_cleanup: closes what `main` opened, when the operator stops.
        state: Kopf's handling state, forgotten when a model is deleted.
    """
    registry = kopf.OperatorRegistry()
    background = Background()

    @kopf.on.login(registry=registry)
    def operator_login(**_: Any) -> kopf.ConnectionInfo:
        return login()

    # Indexes of what the watches deliver: the Reconciler reads models, owned
    # Deployments and pods, and nodes from them instead of asking the API server
    # (see view.py). Deletions leave an index by themselves, except those a
    # watch missed while it was down, which a sweep finds (sweep.py). The
    # functions are coroutines because Kopf runs plain functions in a thread pool
    # (40% of a py-spy profile's samples at 1,000 models were in its threads);
    # they keep plain dicts, since reads through Kopf's Body views showed in
    # that profile.
    @kopf.index(*LLMMODEL, id=MODELS_INDEX, registry=registry)
    async def citadel_models(
        namespace: str | None, name: str | None, body: kopf.Body, **_: Any
    ) -> dict[object, dict[str, Any]]:
        return {(namespace, name): _kept(body)}

    # Owned Deployments and pods, both by (namespace, model).
    @kopf.index(
        "apps", "v1", "deployments", id=DEPLOYMENTS_INDEX, labels=MANAGED,
        registry=registry,
    )  # fmt: skip
    @kopf.index("", "v1", "pods", id=PODS_INDEX, labels=MANAGED, registry=registry)
    async def citadel_by_model(
        namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
    ) -> dict[object, dict[str, Any]] | None:
        owner = labels.get(names.LABEL_MODEL)
        return {(namespace, owner): _kept(body)} if owner else None

    @kopf.index("", "v1", "nodes", id=NODES_INDEX, registry=registry)
    async def citadel_nodes(body: kopf.Body, **_: Any) -> dict[object, dict[str, Any]]:
        return {None: _kept(body)}

    @kopf.on.startup(registry=registry)
    async def operator_startup(**kwargs: Any) -> None:
        # Kopf hands the (still empty) indexes to startup handlers and runs no
        # resource handler before each has its initial listing, nor while this
        # replica stands by for a peer: the routes wait for the first one.
        reconciler.routes.hold()
        view = IndexedView(kwargs)
        reconciler.use(view)
        # Each task starts once: Kopf runs this handler again if it failed.
        if settings.resync_seconds > 0:
            # Not a Kopf timer: it only reads and hides index entries, which is
            # as right for a replica paused for a peer (its indexes stand still
            # until it resumes and lists again) as for an active one.
            sweep = IndexSweep(reconciler.kube, view, settings.list_scopes())
            background.start("index-sweep", lambda: sweep.run(settings.resync_seconds))

        def count(ok: bool) -> None:
            reconciler.metrics.publishes.labels(result="ok" if ok else "error").inc()

        background.start("route-publisher", lambda: reconciler.routes.run(count))
        # Reads no gateway while no model has spec.autoscaling, and acts only
        # in the active replica.
        autoscaler = Autoscaler(
            reconciler.kube,
            settings,
            reconciler.metrics,
            models=lambda: reconciler.view.models(),
            active=lambda: reconciler.active,
            gateways=Gateways(
                reconciler.kube,
                settings.gateway_metrics_urls,
                settings.gateway_metrics_service,
            ),
        )
        background.start("autoscaler", autoscaler.run)
        try:
            await reconciler.routes.ensure()
        except ApiError as err:  # the first kick will write it
            log.warning("could not make the routing ConfigMap: %s", err)
        # Publishing once the indexes are listed drops routes of models deleted
        # while no operator was running.
        reconciler.routes.kick()

    @kopf.on.cleanup(registry=registry)
    async def operator_cleanup(**_: Any) -> None:
        await background.stop()
        await reconciler.stop()
        await on_cleanup()

    # Kopf's liveness endpoint (/healthz) fails while a probe raises: a task the
    # operator relies on that ended gets the pod restarted. A replica standing
    # by for a peer runs both tasks (the publisher waits), so it stays healthy.
    @kopf.on.probe(id="background-tasks", registry=registry)
    async def background_tasks(**_: Any) -> list[str]:
        dead = background.dead()
        if dead:
            # Permanent: a temporary error would make Kopf retry the probe
            # within the request, which would hang until the probe times out.
            raise kopf.PermanentError(f"background tasks ended: {', '.join(dead)}")
        return background.running()

    @kopf.on.resume(*LLMMODEL, id="reconcile-resume", registry=registry)
    @kopf.on.create(*LLMMODEL, id="reconcile-create", registry=registry)
    @kopf.on.update(*LLMMODEL, id="reconcile-update", registry=registry)
    async def llmmodel_reconcile(body: kopf.Body, **_: Any) -> None:
        reconciler.routes.ready()
        await _translated(reconciler.reconcile(body))

    if settings.resync_seconds > 0:
        # A Kopf timer, so that it pauses with the rest of the operator when a
        # peer of higher priority runs.
        @kopf.timer(
            *LLMMODEL,
            id="resync",
            interval=settings.resync_seconds,
            initial_delay=settings.resync_seconds,
            registry=registry,
        )
        async def llmmodel_resync(
            body: kopf.Body,
            namespace: str | None,
            name: str | None,
            uid: str | None,
            **_: Any,
        ) -> None:
            # Also rewrites the routing ConfigMap now and then, in case it was
            # changed or lost (at most once per resync period).
            reconciler.routes.kick(force=True)
            current = await reconciler.view.model(namespace or "", name or "")
            if current is None or current["metadata"].get("uid") != uid:
                # Kopf keeps the timer of a model deleted while the watch was
                # down (no DELETED event came) after the sweep hid it: forgotten
                # here as that event would have, or its metrics would live on.
                if uid:
                    state.forget([uid])
                if current is None and namespace and name:
                    await reconciler.forget(namespace, name)
                return
            await _translated(reconciler.reconcile(body, resync=True))

    if settings.peering is not PeeringMode.STANDALONE:

        @kopf.daemon(
            *_peering_resource(settings),
            id="peering-pause",
            field="metadata.name",
            value=settings.peering_name,
            registry=registry,
        )
        async def peering_pause(stopped: kopf.DaemonStopped, **_: Any) -> None:
            await _sense_pauses(reconciler, stopped)

    _without_finalizers(registry)

    @kopf.on.event(*LLMMODEL, id="llmmodel-event", registry=registry)
    async def llmmodel_event(
        type: str | None,
        namespace: str | None,
        name: str | None,
        uid: str | None,
        **_: Any,
    ) -> None:
        reconciler.routes.ready()
        if type == "DELETED" and namespace and name:
            if uid:
                state.forget([uid])
            await reconciler.forget(namespace, name)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        id="deployment-event",
        labels=MANAGED,
        registry=registry,
    )
    async def deployment_event(
        labels: kopf.Labels, namespace: str | None, **_: Any
    ) -> None:
        reconciler.routes.ready()
        owner = labels.get(names.LABEL_MODEL)
        if owner and namespace:
            reconciler.spawn_refresh(namespace, owner, fix_drift=True)

    # A deleted Service cuts the model off the gateway (its endpoints go too),
    # and one edited by hand (its selector, its port) may send the model's
    # traffic elsewhere: made again or put back at once, as a Deployment is,
    # instead of at the periodic pass. Not by the label alone: the garbage
    # collector deletes a deleted model's Service, and a model made again under
    # its name has its own reconcile coming. A change that takes nothing of
    # ours (another controller's annotation, the operator's own apply) costs no
    # request: the quick drift check on the event's copy decides.
    @kopf.on.event(
        "", "v1", "services", id="service-event", labels=MANAGED, registry=registry
    )
    async def service_event(
        type: str | None,
        labels: kopf.Labels,
        namespace: str | None,
        body: kopf.Body,
        **_: Any,
    ) -> None:
        reconciler.routes.ready()
        owner = labels.get(names.LABEL_MODEL)
        if type not in ("DELETED", "MODIFIED") or not owner or not namespace:
            return
        model = await reconciler.view.model(namespace, owner)
        if model is None or model["metadata"].get("uid") != owner_uid(body):
            return
        if type == "DELETED" or service_drifted(model, body):
            reconciler.spawn_refresh(namespace, owner, fix_service=True)

    @kopf.on.event("", "v1", "pods", id="pod-event", labels=MANAGED, registry=registry)
    async def pod_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
        reconciler.routes.ready()
        owner = labels.get(names.LABEL_MODEL)
        if owner and namespace:
            reconciler.spawn_refresh(namespace, owner)

    # Every cluster has nodes (watched for their index anyway): with no model
    # and nothing of ours left, this is what lets the first document be written,
    # which drops the routes of models deleted while no operator ran.
    @kopf.on.event("", "v1", "nodes", id="node-event", registry=registry)
    async def node_event(**_: Any) -> None:
        reconciler.routes.ready()

    return registry
