"""Reconciling one LLMModel: apply what it owns, then derive and write its status.

This layer knows the Kubernetes API through `Kube` and nothing of Kopf: it raises
`ReconcileError` (retryable or not) and the handlers translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from citadel.gateway.routes import FALLBACKS_FIELD, UnknownNames
from citadel.operator import names
from citadel.operator.builders.common import BuildError, label_selector
from citadel.operator.builders.deployment import build_deployment
from citadel.operator.builders.objects import (
    build_cache_claim,
    build_pdb,
    build_pod_monitor,
    build_service,
)
from citadel.operator.drift import drifted, fingerprint, unchanged_by
from citadel.operator.events import Notice, combined, event_object, transitions
from citadel.operator.kube.client import ApiError, Kube, Manifest
from citadel.operator.kube.heed import AskedWait
from citadel.operator.kube.resources import (
    LLMMODELS,
    PDBS,
    POD_MONITORS,
    PVCS,
    Resource,
    resource_for,
)
from citadel.operator.metrics import Metrics
from citadel.operator.model import LLMModel
from citadel.operator.observe import Blocker, derive_status, lapse_due_in
from citadel.operator.routing import RoutePublisher
from citadel.operator.settings import OperatorSettings
from citadel.operator.status import (
    RECONCILE_FAILED,
    RECONCILE_FAILURES,
    SERVICE_NAME_TAKEN,
    ConditionType,
    LLMModelStatus,
    name_taken,
)
from citadel.operator.view import ApiView, ClusterView, is_newer, resource_version

log = logging.getLogger(__name__)
UNKNOWN_FALLBACK = "UnknownFallback"
"""The Event's reason when a model's fallbacks name no routed model."""
UNKNOWN_SPLIT_TARGET = "UnknownSplitTarget"
"""The Event's reason when a model's split targets name no routed model."""
T = TypeVar("T")
CAPABILITY_CACHE_SECONDS = 60.0
# The longest a status refresh waits behind reconciles of new or changed models
# (see Precedence).
PRECEDENCE_MAX_WAIT_S = 10.0
# The longest a failed reconcile waits for its retry when the API server asks
# for more (Retry-After): a failure that lasts is still tried, and reported,
# that often.
RETRY_AFTER_MAX_S = 600.0
# How long after a lost replica's grace ends its refresh runs (see
# `Reconciler._refresh_at_lapse`).
LAPSE_MARGIN_S = 1.0


def utc_now() -> str:
    """The current time as metav1.Time wants it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ReconcileError(Exception):
    """A reconcile that failed; `retryable` says whether trying again may help,
    and `reason` is the Ready reason the model reports if it does not.

    Attributes:
        delay: seconds before a retry: the back-off asked for, or as long as the
            API server asked (`retry_after_s`) when that is longer, up to
            RETRY_AFTER_MAX_S. A throttling API server (429) or one in trouble
            (503) says how long; retrying sooner adds to its load.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        delay: float = 5.0,
        reason: str = RECONCILE_FAILED,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.delay = delay
        if retry_after_s is not None:
            self.delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
        self.reason = reason


def _request_failed(
    err: ApiError, message: str | None = None, *, retryable: bool | None = None
) -> ReconcileError:
    """The ReconcileError for a failed request: retryable as the request is
    (unless `retryable` says), retried no sooner than the API server asked."""
    return ReconcileError(
        str(err) if message is None else message,
        retryable=err.retryable if retryable is None else retryable,
        retry_after_s=err.retry_after_s,
    )


class _ModelGone(Exception):
    """The model is gone, though the view still shows it (a watch that missed
    its deletion, until sweep.py hides it): nothing is to be made for it."""


@dataclass
class RefreshWish:
    """What a status refresh is asked to do besides deriving the status."""

    fix_drift: bool = False
    """Put the Deployment back first if it was changed by hand (or deleted)."""
    fix_service: bool = False
    """Make the Service again first if it was deleted (or put it back if it
    was changed)."""


@dataclass(frozen=True)
class _Plan:
    """What one pass applies, and how it first found each object's name (see
    `Reconciler._plan`)."""

    deployment: Manifest
    service: Manifest
    pdb: Manifest | None
    """None: the model has no PodDisruptionBudget (one of its own goes)."""
    monitor: Manifest | None
    """None: the PodMonitor CRD is not served, or PodMonitors are turned off
    (`OperatorSettings.pod_monitors`; one of its own goes)."""
    seen: Mapping[str, Manifest | None]
    """Kind -> the object of that name as `_apply` first reads it (None: there
    was none), where the pass may start from that read."""

    def named(self) -> list[Manifest]:
        """Every object the pass applies, the Service first."""
        objects = (self.service, self.deployment, self.pdb, self.monitor)
        return [obj for obj in objects if obj is not None]


class Serializer:
    """One reconcile at a time per model; refresh requests that come while one
    already waits are merged into it and dropped, since it will read the newest
    state anyway."""

    def __init__(self) -> None:
        # A model's lock and how many hold it or wait for it; it goes when the
        # last one leaves, so a model deleted during a reconcile leaves none.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._waiting: dict[str, RefreshWish] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Holds the model's lock."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users > 1:
                self._locks[key] = (lock, users - 1)
            else:
                del self._locks[key]

    @asynccontextmanager
    async def coalesce(
        self,
        key: str,
        wish: RefreshWish,
        first: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[RefreshWish | None]:
        """Yields the wishes of every merged request, holding the lock; or None
        when a request already waits, which then takes `wish` over.

        Args:
            first: awaited before the lock, while this request counts as waiting.
        """
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.fix_drift |= wish.fix_drift
            waiting.fix_service |= wish.fix_service
            yield None
            return
        mine = dataclasses.replace(wish)
        self._waiting[key] = mine
        try:
            if first is not None:
                await first()
            async with self.hold(key):
                del self._waiting[key]
                yield mine
        finally:
            if self._waiting.get(key) is mine:
                del self._waiting[key]

    def held(self) -> set[str]:
        """The models whose lock someone holds or waits for."""
        return set(self._locks)


class Precedence:
    """Changes to models go before status refreshes, within a bound.

    During a burst of new models the API server is the bottleneck, and each
    refresh of a model already created (its pods being scheduled, turning ready)
    delays the Deployments of the models still waiting. Refreshes therefore wait
    while reconciles of new or changed models are pending, up to `max_wait_s`,
    so status still moves during a long burst; a refresh that waited reads the
    newest state, so the intermediate statuses it would have written are skipped.

    Args:
        max_wait_s: the longest a refresh waits for the reconciles to finish.
    """

    def __init__(self, max_wait_s: float) -> None:
        self._max_wait_s = max_wait_s
        self._pending = 0
        self._calm = asyncio.Event()
        self._calm.set()

    @asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        """Marks a reconcile pending for as long as the block runs."""
        self._pending += 1
        self._calm.clear()
        try:
            yield
        finally:
            self._pending -= 1
            if not self._pending:
                self._calm.set()

    async def wait(self) -> None:
        """Returns once no reconcile is pending, or after `max_wait_s`."""
        if self._calm.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._calm.wait(), self._max_wait_s)


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the LLMModel that controls `obj` (its owner reference), if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("controller") and ref.get("kind") == names.KIND:
            return str(ref.get("uid"))
    return None


def _at_version(obj: Manifest, actual: Manifest) -> Manifest:
    """`obj` with `actual`'s resourceVersion, which makes an apply conditional."""
    meta = {**obj["metadata"], "resourceVersion": actual["metadata"]["resourceVersion"]}
    return {**obj, "metadata": meta}


def _refers_to(obj: Manifest, uid: str) -> bool:
    """Whether `obj` has an owner reference to `uid`."""
    refs = obj.get("metadata", {}).get("ownerReferences", []) or []
    return any(ref.get("uid") == uid for ref in refs)


def service_drifted(model: Mapping[str, Any], service: Mapping[str, Any]) -> bool:
    """Whether `service`, the Service of the LLMModel `model`, lost something
    the operator's apply sets, by the quick check (a put-back confirms it with
    a dry run first). False for a model whose spec cannot be read: its periodic
    pass says why."""
    try:
        desired = build_service(LLMModel.from_body(model))
    except ValidationError:
        return False
    return drifted(desired, dict(service))


def _first_look(model: LLMModel) -> bool:
    """Whether this generation of the model was never reconciled."""
    return model.status.observed_generation != model.generation


def _stored_failure(model: LLMModel) -> Blocker | None:
    """The permanent failure of this generation's reconcile, as the model's
    status reports it (written by this operator before it restarted, or by a
    peer); None when it reports none.

    `Reconciler._failed` holds it only in memory: without this, the first
    refresh after a restart wrote the unapplied generation as Ready.
    """
    if _first_look(model):
        return None
    ready = model.status.condition(ConditionType.READY)
    if ready is None or ready.status != "False":
        return None
    if ready.reason not in RECONCILE_FAILURES:
        return None
    if ready.observed_generation not in (None, model.generation):
        return None
    return Blocker(ready.reason, ready.message)


def _refuses_dry_runs(err: ApiError) -> bool:
    """Whether `err` says dry runs cannot be made (an admission webhook that
    declares side effects), rather than that this apply is refused."""
    return err.status == 400 and "dry run" in err.message.lower()


def _created_for(claim: Manifest, model: LLMModel) -> str | None:
    """The uid of the model the operator created `claim` for; None when the
    operator did not create it.

    Its marks say so when `created-as` is the claim's own uid: annotations can be
    copied onto another claim, its uid cannot. A claim marked only `created-for`
    (the write after the create has not happened yet) counts for that model
    alone. Claims made before the marks count as created for `model` when they
    carry its owner reference (deletePolicy Delete); the next apply marks them.
    """
    meta = claim.get("metadata", {})
    annotations = meta.get("annotations") or {}
    made_for = annotations.get(names.ANNOTATION_CREATED_FOR)
    made_as = annotations.get(names.ANNOTATION_CREATED_AS)
    if made_for and made_as:
        return str(made_for) if made_as == meta.get("uid") else None
    if made_for:
        return model.uid if made_for == model.uid else None
    return model.uid if owner_uid(claim) == model.uid else None


def _with_spec_of(claim: Manifest, current: Manifest) -> Manifest:
    """`claim` with the spec fields it sets as `current` has them."""
    spec = current.get("spec", {})
    return {**claim, "spec": {k: spec[k] for k in claim["spec"] if k in spec}}


def _built_claim(model: LLMModel, created_for: str, created_as: str | None) -> Manifest:
    claim = build_cache_claim(model, created_for, created_as)
    assert claim is not None, "only called for a model with spec.cache"
    return claim


def _is_ours(obj: Manifest) -> bool:
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    return labels.get(names.LABEL_MANAGED_BY) == names.MANAGER_NAME


def _refusal(model: LLMModel, obj: Manifest, current: Manifest | None) -> None:
    """Raises when `current`, the object of `obj`'s name, is not the model's.

    Raises:
        ReconcileError: it is someone else's (for good: the status names it), or
            a deleted model's of the same name still being cleaned up (retryable).
    """
    if current is None or owner_uid(current) == model.uid:
        return
    kind, name = obj["kind"], obj["metadata"]["name"]
    if owner_uid(current) is not None and _is_ours(current):
        raise ReconcileError(
            f"{kind} {name} already exists and does not belong to this LLMModel "
            "yet (a deleted one of the same name is being cleaned up)",
            retryable=True,
        )
    # The Service's clash has a reason of its own: the routes leave the model
    # out for it (routing.service_taken).
    reason = SERVICE_NAME_TAKEN if kind == "Service" else RECONCILE_FAILED
    raise ReconcileError(name_taken(kind, name), retryable=False, reason=reason)


class Reconciler:
    """Makes the cluster match each LLMModel and reports what it sees."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        metrics: Metrics,
        clock: Callable[[], str] = utc_now,
        view: ClusterView | None = None,
        asked_wait: AskedWait | None = None,
    ) -> None:
        # Until when the API server asked this process to wait (Retry-After),
        # as any request's answer said: `kube` tells it every refusal (its
        # `on_refusal`, wired in main), and periodic passes and refreshes send
        # nothing before then (see `_told_to_wait`). Without one, nothing asks.
        self.asked_wait = (
            asked_wait if asked_wait is not None else AskedWait(RETRY_AFTER_MAX_S)
        )
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.view: ClusterView = view or ApiView(self.kube, settings.list_scopes())
        # Through `self.view` at each publish: `use` swaps it once Kopf's indexes
        # exist.
        self.routes = RoutePublisher(
            self.kube,
            settings,
            on_conflicts=self._recheck,
            source=lambda: self.view.models(),
            on_unknown_names=self._tell_unknown_names,
        )
        self._clock = clock
        self._serial = Serializer()
        # Bound the API work in flight; waiters are woken in arrival order.
        # Refreshes have slots of their own so that, during a burst of new
        # models, those already running still get their status (Ready) written,
        # after waiting a bounded time for the burst (Precedence): at 500 models
        # that moved apply-to-Deployment p50 from 17.5 to 12.5 s with all Ready
        # as soon (one run each, bench/citadel_bench/operator_scale.py).
        self._slots = asyncio.Semaphore(settings.max_concurrent_reconciles)
        self._refresh_slots = asyncio.Semaphore(settings.max_concurrent_reconciles)
        # Periodic resyncs of unchanged models queue here first, so they never
        # hold more than an eighth of the slots: every model's timer fires about
        # one resync period after the operator first saw it, and after a burst
        # of creations those resyncs arrive together; a new model waiting behind
        # them took 8 s to get its Deployment (`make bench` at 1f4ae66).
        self._resync_slots = asyncio.Semaphore(
            max(1, settings.max_concurrent_reconciles // 8)
        )
        self._precedence = Precedence(PRECEDENCE_MAX_WAIT_S)
        self._monitoring_cache: tuple[float, bool] | None = None
        # Each model's body as our last status write returned it, until the watch
        # (and so the view) catches up: a refresh in between must not compare
        # against the status before that write (it would write and announce the
        # same change twice).
        self._written: dict[str, Manifest] = {}
        # Per model and kind, the fingerprint (drift.fingerprint) of an owned
        # object that needs no apply of ours: a drift check the dry run refuted,
        # or what our last forced apply left. Not checked again until it or our
        # apply changes.
        self._settled: dict[str, dict[str, str]] = {}
        # Per model, the generation whose reconcile failed for good, and why.
        self._failed: dict[str, tuple[int, Blocker]] = {}
        # Per model, the refresh asked for when a replica that served will have
        # been not ready for the grace, or a sidecar's crash loop will be over
        # (observe.lapse_due_in).
        self._lapses: dict[str, asyncio.TimerHandle] = {}
        # Refreshes running as tasks of their own (see spawn_refresh).
        self._spawned: set[asyncio.Task[None]] = set()
        # Whether this replica stands by for a peer (see pause).
        self._paused = False

    def use(self, view: ClusterView) -> None:
        """Reads through `view` from now on (the handlers' indexes, once Kopf has
        made them)."""
        self.view = view

    def pause(self) -> None:
        """This replica stands by for a peer until `resume()`: it writes no
        status and no routing document.

        Kopf stops its watches, handlers and timers, but not what they set off
        in tasks of their own: the refreshes (cancelled here, and no new one
        starts) and the route publisher's pending writes and retries. Each
        would write from indexes frozen at the pause over what the peer, which
        sees the cluster as it is, writes.
        """
        self._paused = True
        self.routes.pause()
        for task in list(self._spawned):
            task.cancel()

    @property
    def active(self) -> bool:
        """Whether this replica is the one that acts: not paused for a peer,
        and past its first handler (a replica that starts standing by runs
        none: see `RoutePublisher.hold`)."""
        return not self._paused and not self.routes.holding

    def resume(self) -> None:
        """This replica is active again after `pause()`: the routing document is
        written again once the models are listed anew (see
        `RoutePublisher.resume`)."""
        self._paused = False
        self.routes.resume()

    # -- entry points ------------------------------------------------------------

    async def reconcile(
        self, body: Mapping[str, Any], *, resync: bool = False
    ) -> LLMModelStatus:
        """Applies every owned object of the model in `body`, then its status.

        Args:
            body: the LLMModel.
            resync: a periodic pass over an unchanged model, which yields to
                new and changed models for most of the slots.

        Raises:
            ReconcileError: a request failed or the model cannot be built.
        """
        meta = body.get("metadata", {})
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        key = f"{namespace}/{name}"
        # Kopf called us, so this replica is active: its report of the model stands
        # even if this pass fails.
        self.metrics.touch(namespace, name)
        async with contextlib.AsyncExitStack() as held:
            if resync:
                await held.enter_async_context(self._resync_slots)
            else:
                await held.enter_async_context(self._precedence.urgent())
            await held.enter_async_context(self._serial.hold(key))
            model = await self._parse(self._newest(key, body))
            if resync and self._told_to_wait(key, "periodic pass"):
                return model.status
            # A generation not yet reconciled (its update may be waiting for a
            # slot or backing off), or whose reconcile failed for good (here or
            # before a restart, as the status says), was never applied in full:
            # its periodic pass applies everything (a field the new spec drops
            # is no drift).
            timer, resync = (
                resync,
                resync
                and not (
                    model.key in self._failed
                    or _first_look(model)
                    or _stored_failure(model) is not None
                ),
            )
            with self.metrics.timed("full"):
                try:
                    # Two turns in the queue for slots: the Deployment (and the
                    # claim it mounts) first; the rest and the status queue again,
                    # behind the Deployments of the models that came meanwhile.
                    # Pods take minutes to pull and load a model, and what the
                    # operator makes beside them (Service, PDB, PodMonitor,
                    # status) can wait for the pods of the next models to start.
                    # Burst of 1,000 models on the local cluster
                    # (bench/citadel_bench/operator_scale.py, four runs of two
                    # turns, two of one pass): apply-to-Deployment p99 18-22 s
                    # against 54-68 s; all Ready 1.38-1.62x the no-operator
                    # floor against 1.56-1.67x, the same within the spread; but
                    # the median model turned Ready later (53-62 s against 42 s
                    # in one run), its status queued behind the Deployments of
                    # the models after it.
                    async with self._slots:
                        if not await self._still_there(model):
                            # Deleted while it waited: a claim made now would
                            # outlive it (Retain), owned objects would only give
                            # the garbage collector work.
                            return model.status
                        if timer and not resync:
                            # Applies in full, so makes whatever is missing: a
                            # timer outlives a deletion its watch missed.
                            await self._confirm_there(model)
                        plan = await self._plan(model, resync)
                        deployment = await self._apply_workload(model, plan, resync)
                    async with self._slots:
                        if not await self._still_there(model):
                            return model.status
                        await self._apply_rest(model, plan, resync)
                        status = await self._refresh(
                            model, deployment=await self._newer(model, deployment)
                        )
                except _ModelGone:
                    log.info("%s is gone: nothing made for it", model.key)
                    return model.status
                except ReconcileError as err:
                    self.metrics.errors.labels(
                        error="temporary" if err.retryable else "permanent"
                    ).inc()
                    if not err.retryable:
                        # Say it where people look, not only in the logs; and
                        # keep saying it: refreshes report this generation too.
                        blocker = Blocker(err.reason, str(err))
                        self._failed[model.key] = (model.generation, blocker)
                        with contextlib.suppress(ReconcileError):
                            async with self._slots:
                                await self._refresh(model, blocker)
                    raise
        self._failed.pop(model.key, None)
        self.routes.kick()
        log.info(
            "reconciled %s (generation %d): %s, %d/%d ready",
            model.key,
            model.generation,
            status.phase,
            status.replicas.ready,
            status.replicas.desired,
        )
        return status

    async def refresh(
        self,
        namespace: str,
        name: str,
        *,
        fix_drift: bool = False,
        fix_service: bool = False,
    ) -> None:
        """Re-derives the status after a change to an owned object or pod.

        With `fix_drift`, the Deployment is first put back if it was changed by hand
        (or deleted); with `fix_service`, the Service likewise. Errors are logged:
        the next event or resync tries again.
        """
        key = f"{namespace}/{name}"
        # Waits for the reconciles of new models before the model's lock (a
        # reconcile of this model may be what it waits for), already counted as
        # waiting: during a burst, each event of a model's pods and Deployment
        # asks for a refresh, and all but one are merged into it.
        async with self._serial.coalesce(
            key, RefreshWish(fix_drift, fix_service), first=self._precedence.wait
        ) as wish:
            if wish is None:
                return
            try:
                async with self._refresh_slots:
                    if self._told_to_wait(key, "status refresh"):
                        return
                    with self.metrics.timed("refresh"):
                        body = await self.view.model(namespace, name)
                        if body is None or body["metadata"].get("deletionTimestamp"):
                            return
                        model = LLMModel.from_body(self._newest(key, body))
                        if _first_look(model):
                            # A reconcile of this generation is on its way: the
                            # Deployment would look drifted against the new
                            # spec, and a status written now would claim the
                            # generation observed before it is applied.
                            return
                        failure = self._failed.get(key)
                        blocker = None
                        if failure is not None and failure[0] == model.generation:
                            # The spec that failed is not applied: nothing to put
                            # back, and the failure stays in the status.
                            blocker = failure[1]
                        elif failure is None:
                            # Failed before this operator started: the same
                            # until a reconcile of this generation succeeds.
                            blocker = _stored_failure(model)
                        if blocker is None:
                            await self._revert_drift(model, wish)
                        await self._refresh(model, blocker)
            except _ModelGone:
                log.info("%s is gone: nothing of it is made again", key)
            except (ApiError, ReconcileError, ValidationError) as err:
                log.warning("refreshing %s failed: %s", key, err)

    def _told_to_wait(self, key: str, what: str) -> bool:
        """Whether the API server asked this process to wait (Retry-After) for
        longer still; `what` (of the model `key`) then sends nothing.

        Checked once the pass has its slot, where its requests would start: a
        pass queued before the answer came must not send them either. The next
        period or event after the wait does what it would have done; a changed
        spec's reconcile is not held back, and its failure retries no sooner
        than asked (`ReconcileError.delay`).
        """
        left = self.asked_wait.left()
        if left > 0:
            log.debug(
                "%s: %s skipped: the API server asked to wait %.1f s more",
                key,
                what,
                left,
            )
        return left > 0

    async def forget(self, namespace: str, name: str) -> None:
        """The model is gone: drop its route and metrics."""
        key = f"{namespace}/{name}"
        self.metrics.set_model(namespace, name, None)
        self._written.pop(key, None)
        self._settled.pop(key, None)
        self._failed.pop(key, None)
        self._refresh_at_lapse(key, None)
        self.routes.kick()

    def _newest(self, key: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """`body`, or the reply of our last status write when that is newer."""
        written = self._written.get(key)
        if written is None:
            return body
        same = written.get("metadata", {}).get("uid") == body.get("metadata", {}).get(
            "uid"
        )
        if same and is_newer(written, body):
            return written
        del self._written[key]
        return body

    # -- applying ----------------------------------------------------------------

    async def _parse(self, body: Mapping[str, Any]) -> LLMModel:
        try:
            return LLMModel.from_body(body)
        except ValidationError as err:
            # Only objects stored before a stricter CRD can get here.
            raise ReconcileError(f"invalid spec: {err}", retryable=False) from err

    async def _look(
        self,
        model: LLMModel,
        obj: Manifest,
        known: Manifest | None = None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        """The object of `obj`'s name as `_apply` starts from it: as `known` from
        a watch, else read from etcd; with `cached`, read from the API server's
        cache instead (a resync's start: a missed event is what that pass is
        for, so not the watch).

        The views hold only objects labelled as ours: one of that name without
        the label, maybe someone else's, is found by the read.
        """
        resource = resource_for(obj["apiVersion"], obj["kind"])
        name = obj["metadata"]["name"]
        if cached:
            return await self._existing(
                resource, name, model.namespace, None, cached=True
            )
        return await self._existing(resource, name, model.namespace, known)

    async def _apply(
        self,
        model: LLMModel,
        obj: Manifest,
        first: Manifest | None,
        *,
        resync: bool = False,
    ) -> Manifest:
        """Applies `obj` unless an object of that name belongs to someone else.

        Args:
            first: the object of that name as `_look` found it (None: none),
                from the API server's cache on a resync.
            resync: a periodic pass over an unchanged model: applied only if it
                lost something `obj` sets (see `_holds` and `_put_back`).

        Returns:
            The object as applied, or as found when left alone.
        """
        current = first
        if resync:
            # The cache says whether there is anything to do; what is done is
            # decided on etcd's copy, as the cache may be behind.
            if (
                first is not None
                and owner_uid(first) == model.uid
                and self._holds(model, obj, first)
            ):
                return first
            current = await self._look(model, obj)
        _refusal(model, obj, current)
        if resync:
            return await self._put_back(model, obj, current, conditional=True)
        applied: Manifest = await self._call(self.kube.apply(obj))
        return applied

    async def _put_back(
        self,
        model: LLMModel,
        desired: Manifest,
        actual: Manifest | None,
        *,
        conditional: bool = False,
    ) -> Manifest:
        """Applies `desired` over `actual` (ours) if it drifted, as a dry run
        confirms, with a DriftReverted event; returns the object as it is after.

        Args:
            conditional: apply only to `actual`'s version (read from etcd just
                before): one changed since, even replaced by someone else's, is
                left for the next pass. Not for a Deployment as the watch saw it:
                its controller writes its status often, and a put-back refused
                for that waited for the next event (seen in the e2e tests).
        """
        kind, name = desired["kind"], desired["metadata"]["name"]
        if actual is not None and not (
            drifted(desired, actual)
            and await self._call(self._apply_would_change(model, desired, actual))
        ):
            return actual
        if actual is None:
            await self._confirm_there(model)
        if conditional and actual is not None:
            applied = await self._unless_changed(
                model, desired, self.kube.apply(_at_version(desired, actual))
            )
            if applied is None:
                return actual
            result: Manifest = applied
        else:
            result = await self._call(self.kube.apply(desired))
        # Applying the same again would change nothing, whatever the quick check
        # says (it decides alone when dry runs are refused).
        self._settle(model, kind, fingerprint(desired, result))
        self.metrics.drift.labels(kind=kind).inc()
        what = "created the missing" if actual is None else "put back manual changes to"
        await self._post(
            model, Notice("Normal", "DriftReverted", f"{what} {kind} {name}")
        )
        return result

    def _holds(self, model: LLMModel, desired: Manifest, actual: Manifest) -> bool:
        """Whether `actual` holds everything our apply of `desired` sets: by the
        quick check, or by a dry run that refuted it (its mark in `_settled`).

        Only for periodic passes: a changed spec, a new operator (resume) or a
        failed spec change applies in full, so that fields we stopped setting go
        too. Applying every owned object at each pass was three server-side
        applies and three reads from etcd per model and period: with 1,000 Ready
        models on the local cluster, 50 requests a second and 0.16 of a core of
        API server CPU while nothing changed (a scratch run on 2026-12-06: 240 s
        with the operator at 2337ff9, 240 s with it stopped). Now a pass that
        finds nothing to do makes only reads from the API server's cache: 0.02
        of a core in the same run at c1652df (`make bench` reports it as "At
        rest").
        """
        if not drifted(desired, actual):
            return True
        return self._settled_as(model, desired["kind"]) == fingerprint(desired, actual)

    def _settled_as(self, model: LLMModel, kind: str) -> str | None:
        """The fingerprint of the model's `kind` that needs no apply, if any."""
        return self._settled.get(model.key, {}).get(kind)

    def _settle(self, model: LLMModel, kind: str, mark: str) -> None:
        self._settled.setdefault(model.key, {})[kind] = mark

    async def _existing(
        self,
        resource: Resource,
        name: str,
        namespace: str,
        known: Manifest | None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        """The object as `known` from a watch, else read from the API (from its
        cache with `cached`): the views hold only objects labelled as ours, and
        one of that name without the label may be someone else's."""
        if known is not None:
            return known
        found: Manifest | None = await self._call(
            self.kube.get(resource, name, namespace, cached=cached)
        )
        return found

    async def _unless_changed(
        self, model: LLMModel, obj: Manifest, request: Awaitable[T]
    ) -> T | None:
        """Runs a write conditional on what was read (a resourceVersion, a uid);
        None when `obj` changed since, which leaves it for the next pass."""
        try:
            return await request
        except ApiError as err:
            if err.status != 409:
                raise _request_failed(err) from err
        log.info(
            "%s: %s %s changed since it was read; left for the next pass",
            model.key,
            obj["kind"],
            obj["metadata"]["name"],
        )
        return None

    async def _call(self, request: Any) -> Any:
        try:
            return await request
        except ApiError as err:
            raise _request_failed(err) from err

    async def _plan(self, model: LLMModel, resync: bool) -> _Plan:
        """Builds what the pass applies, and refuses it before anything is
        written if a name it uses belongs to someone else.

        Checked before any write, as each apply's own check came too late: a
        model refused its Service was left with its multi-GPU Deployment
        running and a Retain claim made for it. The Service is checked first,
        so that the failure names it whenever it is taken: the routes leave
        such a model out (routing.service_taken). The claim's name is no
        clash: a claim the operator did not make is used as it is.

        One read per object, all at once, and no more where the pass read
        anyway: the Deployment's apply starts from this read (the index's
        copy, else etcd's; on a resync the API server's cache), and so do a
        resync's other applies (the cache). A full pass reads the Service,
        PDB and PodMonitor here from the API server's cache, a request each
        that it did not make before, and from etcd again right before each
        apply, in its second turn. A clash the cache shows is confirmed on
        etcd's copy, which may differ.

        Raises:
            ReconcileError: a name is taken, or a read failed.
        """
        deployment = self._deployment(model)
        monitor = None
        if self.settings.pod_monitors and await self._monitoring_installed():
            monitor = build_pod_monitor(model, self.settings.pod_monitor_labels)
        plan = _Plan(deployment, build_service(model), build_pdb(model), monitor, {})
        known = await self._call(self.view.deployment(model.namespace, model.name))
        found = await asyncio.gather(
            *(
                self._look(model, obj, known, cached=resync)
                if obj is deployment
                else self._look(model, obj, cached=True)
                for obj in plan.named()
            )
        )
        for obj, current in zip(plan.named(), found, strict=True):
            if (
                current is not None
                and owner_uid(current) != model.uid
                and (obj is not deployment or resync)
            ):
                current = await self._look(model, obj)  # the cache may be behind
            _refusal(model, obj, current)
        seen = {
            obj["kind"]: first
            for obj, first in zip(plan.named(), found, strict=True)
            if resync or obj is deployment
        }
        return dataclasses.replace(plan, seen=seen)

    async def _apply_workload(
        self, model: LLMModel, plan: _Plan, resync: bool
    ) -> Manifest:
        """Applies the cache claim and the Deployment (on a resync, only what
        drifted; see `_apply`); returns the Deployment as applied or found."""
        if model.spec.cache is not None:
            await self._apply_claim(model, _first_look(model), resync)
        first = plan.seen[plan.deployment["kind"]]
        return await self._apply(model, plan.deployment, first, resync=resync)

    def _deployment(self, model: LLMModel) -> Manifest:
        """The model's Deployment; a spec it cannot be built from is a permanent
        failure (the status says why), not an error Kopf would retry forever."""
        try:
            return build_deployment(model, self.settings)
        except BuildError as err:
            raise ReconcileError(str(err), retryable=False) from err

    async def _apply_rest(self, model: LLMModel, plan: _Plan, resync: bool) -> None:
        """Applies what the model owns besides its workload (on a resync, only
        what drifted)."""
        first_look = _first_look(model)
        await self._apply_named(model, plan, plan.service, resync)
        if plan.pdb is not None:
            await self._apply_named(model, plan, plan.pdb, resync)
        else:
            await self._delete_owned(model, PDBS, model.name, resync=resync)
        if plan.monitor is not None:
            await self._apply_named(model, plan, plan.monitor, resync)
        elif not self.settings.pod_monitors:
            # Turned off (the chart's monitoring.enabled=false): one made while
            # they were on is ours and goes; one of that name that someone else
            # made stays. Without the CRD there is none to look for.
            if await self._monitoring_installed():
                await self._delete_owned(model, POD_MONITORS, model.name, resync=resync)
        elif first_look:
            await self._post(
                model,
                Notice(
                    "Normal",
                    "MonitoringUnavailable",
                    "the Prometheus Operator CRDs (monitoring.coreos.com/v1 "
                    "PodMonitor) are not installed: no PodMonitor was created and "
                    "vLLM's metrics are not scraped",
                ),
            )

    async def _apply_named(
        self, model: LLMModel, plan: _Plan, obj: Manifest, resync: bool
    ) -> None:
        """Applies `obj` from the plan's read of it where the pass may start from
        that, else from etcd's copy read now: the plan's, in the first turn, may
        be seconds old, and the apply must not merge into an object made since."""
        kind = obj["kind"]
        first = plan.seen[kind] if kind in plan.seen else await self._look(model, obj)
        await self._apply(model, obj, first, resync=resync)

    async def _still_there(self, model: LLMModel, *, fresh: bool = False) -> bool:
        """Whether the model still exists, as the same object, not being deleted:
        as the view shows it, or with `fresh` as etcd has it."""
        if fresh:
            body = await self._call(
                self.kube.get(LLMMODELS, model.name, model.namespace)
            )
        else:
            body = await self._call(self.view.model(model.namespace, model.name))
        meta = body.get("metadata", {}) if body else {}
        return meta.get("uid") == model.uid and not meta.get("deletionTimestamp")

    async def _confirm_there(self, model: LLMModel) -> None:
        """Before making an owned object again: a model whose deletion a watch
        missed would get it back at every pass (and a Retain claim for good)
        until the sweep hides it. One read from etcd, only when something is
        missing.

        Raises:
            _ModelGone: it is gone.
        """
        if not await self._still_there(model, fresh=True):
            raise _ModelGone(model.key)

    async def _newer(self, model: LLMModel, applied: Manifest) -> Manifest:
        """The Deployment as applied, or as the watch saw it since if newer."""
        seen = await self._call(self.view.deployment(model.namespace, model.name))
        return seen if seen is not None and is_newer(seen, applied) else applied

    async def _apply_claim(
        self, model: LLMModel, first_look: bool, resync: bool = False
    ) -> None:
        name = names.cache_claim_name(model.name)
        if resync:
            # As in `_apply`: the cache says whether there is anything to do.
            cached = await self._existing(
                PVCS, name, model.namespace, None, cached=True
            )
            if cached is not None and self._claim_holds(model, cached):
                return
        current = await self._existing(PVCS, name, model.namespace, None)
        if current is None:
            if resync:
                await self._confirm_there(model)
            await self._create_claim(model)
            return
        created_for = _created_for(current, model)
        if created_for is None:
            # A claim the operator did not create (whatever its labels say): used
            # as it is, never changed, never given an owner reference.
            if first_look:
                await self._post(
                    model,
                    Notice(
                        "Normal",
                        "CacheClaimAdopted",
                        f"using the existing PersistentVolumeClaim {name} as the cache "
                        "without changing it: the operator did not create it",
                    ),
                )
            return
        claim = _built_claim(model, created_for, current["metadata"].get("uid"))
        applied = await self._apply_claim_spec(model, claim, current, first_look)
        if "ownerReferences" not in claim["metadata"]:
            await self._drop_owner(model, applied)

    def _claim_holds(self, model: LLMModel, claim: Manifest) -> bool:
        """Whether a periodic pass has nothing to do to the claim: not ours (never
        changed), or holding what we set, with no owner reference to drop."""
        created_for = _created_for(claim, model)
        if created_for is None:
            return True
        desired = _built_claim(model, created_for, claim["metadata"].get("uid"))
        if "ownerReferences" not in desired["metadata"] and _refers_to(
            claim, model.uid
        ):
            return False
        return self._holds(model, desired, claim)

    async def _apply_claim_spec(
        self, model: LLMModel, claim: Manifest, current: Manifest, first_look: bool
    ) -> Manifest:
        """Applies `claim`; where its spec is refused (a resize the class does
        not allow, a quota), its metadata alone, if it does not hold already."""
        name = claim["metadata"]["name"]
        try:
            applied: Manifest = await self.kube.apply(claim)
        except ApiError as err:
            if err.retryable:
                raise _request_failed(err) from err
            # Claims are mostly immutable (a class may not allow resizing): the
            # model keeps running on the claim it has. Said once per change of
            # the spec, not at every resync while the spec still asks. Each
            # periodic pass asks again (a refusal stores nothing): a quota
            # raised, or a class that allows expansion now, lets it through.
            log.warning("cache claim %s/%s not updated: %s", model.namespace, name, err)
            if first_look:
                await self._post(
                    model,
                    Notice("Warning", "CacheClaimNotUpdated", f"{name}: {err.message}"),
                )
            kept = _with_spec_of(claim, current)
            if self._holds(model, kept, current):
                # Without this check each pass wrote twice while the spec asked:
                # the refused apply and this one.
                return current
            return await self._apply_claim_metadata(kept)
        return applied

    async def _create_claim(self, model: LLMModel) -> None:
        """Creates the cache claim, marked as the operator's.

        A create, not an apply, so that a claim someone makes at the same moment is
        refused (409) rather than merged into and marked. It carries its owner
        reference (deletePolicy Delete) from the first moment, so no model deleted
        meanwhile leaves it behind. Then its own uid is added to its marks.
        """
        claim = _built_claim(model, model.uid, None)
        try:
            created = await self.kube.create(claim)
        except ApiError as err:
            if err.status == 409:
                raise _request_failed(
                    err,
                    f"PersistentVolumeClaim {claim['metadata']['name']} was created "
                    "by someone else meanwhile; looking again",
                    retryable=True,
                ) from err
            raise _request_failed(err) from err
        uid = created.get("metadata", {}).get("uid")
        await self._call(self.kube.apply(_built_claim(model, model.uid, uid)))

    async def _drop_owner(self, model: LLMModel, claim: Manifest) -> None:
        """Removes the model's owner reference from a claim to retain.

        The create set it, so the create's field manager entry owns it too, and
        an apply without it leaves it in place: a JSON patch removes it, tested
        against the uid so that a list changed meanwhile is not cut wrongly.
        """
        refs = claim.get("metadata", {}).get("ownerReferences") or []
        for i, ref in enumerate(refs):
            if ref.get("uid") == model.uid:
                path = f"/metadata/ownerReferences/{i}"
                operations = [
                    {"op": "test", "path": f"{path}/uid", "value": model.uid},
                    {"op": "remove", "path": path},
                ]
                name = claim["metadata"]["name"]
                await self._call(
                    self.kube.json_patch(PVCS, name, model.namespace, operations)
                )
                return

    async def _apply_claim_metadata(self, kept: Manifest) -> Manifest:
        """Applies `kept`, our claim with the spec the claim has now: its
        metadata still follows the model. Above all the owner reference, which
        deletePolicy sets or removes: a refused resize must not leave a Retain
        claim to be deleted with its model."""
        try:
            applied: Manifest = await self.kube.apply(kept)
        except ApiError as err:
            raise _request_failed(
                err,
                f"PersistentVolumeClaim {kept['metadata']['name']}: its owner "
                f"reference could not follow deletePolicy: {err.message}",
            ) from err
        return applied

    async def _delete_owned(
        self, model: LLMModel, resource: Resource, name: str, *, resync: bool = False
    ) -> None:
        """Deletes the object if it is the model's (on a resync, if the API
        server's cache says there is one; checked again on etcd's copy)."""
        if resync:
            cached = await self._existing(
                resource, name, model.namespace, None, cached=True
            )
            if cached is None or owner_uid(cached) != model.uid:
                return
        current = await self._existing(resource, name, model.namespace, None)
        if current is not None and owner_uid(current) == model.uid:
            # Only that very object: one made under the same name since is not.
            uid = current["metadata"]["uid"]
            await self._unless_changed(
                model,
                current,
                self.kube.delete(resource, name, model.namespace, uid=uid),
            )

    async def _monitoring_installed(self) -> bool:
        now = time.monotonic()
        if (
            self._monitoring_cache
            and now - self._monitoring_cache[0] < CAPABILITY_CACHE_SECONDS
        ):
            return self._monitoring_cache[1]
        found = bool(await self._call(self.kube.has_resource(POD_MONITORS)))
        self._monitoring_cache = (now, found)
        return found

    async def _revert_drift(self, model: LLMModel, wish: RefreshWish) -> None:
        """Puts back what `wish` names: the Service, read from etcd (the operator
        keeps no index of Services), and the Deployment, as its watch saw it."""
        if wish.fix_service:
            await self._put_back_owned(model, build_service(model), None)
        if wish.fix_drift:
            known = await self.view.deployment(model.namespace, model.name)
            await self._put_back_owned(model, self._deployment(model), known)

    async def _put_back_owned(
        self, model: LLMModel, desired: Manifest, known: Manifest | None
    ) -> None:
        """`_put_back` unless an object of that name is someone else's."""
        actual = await self._look(model, desired, known)
        if actual is not None and owner_uid(actual) != model.uid:
            return
        await self._put_back(model, desired, actual)

    async def _apply_would_change(
        self, model: LLMModel, desired: Manifest, actual: Manifest
    ) -> bool:
        """Whether applying `desired` would change `actual`, as a dry run on the
        API server says: it alone knows every form it rewrites."""
        kind = desired["kind"]
        mark = fingerprint(desired, actual)
        if self._settled_as(model, kind) == mark:
            return False
        try:
            result = await self.kube.apply(desired, dry_run=True)
        except ApiError as err:
            if err.retryable or not _refuses_dry_runs(err):
                raise
            # An admission webhook with side effects refuses every dry run:
            # the quick check decides alone, as it did before dry runs.
            log.warning("%s: dry run refused, so not confirmed: %s", model.key, err)
            return True
        if resource_version(result) != resource_version(actual):
            # The view is behind the server, so the answer is not about `actual`;
            # the watch event of the newer version (or the next resync, for what
            # is not watched) asks again.
            return False
        if unchanged_by(result, actual):
            if await self._still_there(model):  # else forget() has run
                self._settle(model, kind, mark)
            log.info("%s: the %s differs only in form; left as it is", model.key, kind)
            return False
        return True

    # -- status ------------------------------------------------------------------

    async def _refresh(
        self,
        model: LLMModel,
        blocker: Blocker | None = None,
        deployment: Manifest | None = None,
    ) -> LLMModelStatus:
        """Derives and writes the status.

        Args:
            deployment: the Deployment just applied (newer than the view's).
        """
        if deployment is None:
            deployment = await self._call(
                self.view.deployment(model.namespace, model.name)
            )
        pods = await self._call(
            self.view.pods(model.namespace, model.name, label_selector(model))
        )
        conflict = await self._call(self.routes.conflict(model.key))
        if conflict and blocker is None:
            blocker = Blocker("ServedNameConflict", conflict)
        now = self._clock()
        status = derive_status(
            model,
            deployment,
            pods,
            await self._call(self.view.nodes()),
            now,
            blocker,
            nodes_autoscaled=self.settings.nodes_autoscaled,
        )
        if status != model.status and self._paused:
            # A pass that Kopf started before the pause: its view is frozen,
            # and the peer reports the model now.
            log.info("%s: status not written: paused for a peer", model.key)
        elif status != model.status:
            written = await self._call(
                self.kube.apply(status_patch(model, status), subresource="status")
            )
            if written:
                self._written[model.key] = written
            if status.phase != model.status.phase:
                log.info("%s: %s -> %s", model.key, model.status.phase, status.phase)
            notice = combined(transitions(model.status, status))
            if notice is not None:
                await self._post(model, notice)
            self.routes.kick()
        # A pass that started before the model was deleted may end after
        # forget(): its report would bring the deleted model's series back, and
        # its lapse timer would refresh a model that is gone (forget() cancels
        # only the timers armed before it).
        current = await self._call(self.view.model(model.namespace, model.name))
        if current is not None and current["metadata"].get("uid") == model.uid:
            self.metrics.set_model(model.namespace, model.name, status)
            self._refresh_at_lapse(model.key, lapse_due_in(pods, now))
        return status

    async def _post(self, model: LLMModel, notice: Notice) -> None:
        try:
            await self.kube.create(event_object(model, notice, self._clock()))
        except ApiError as err:
            # An event is worth less than the reconcile that wanted to post it.
            log.warning(
                "could not post event %s for %s: %s", notice.reason, model.key, err
            )

    def spawn_refresh(
        self,
        namespace: str,
        name: str,
        *,
        fix_drift: bool = False,
        fix_service: bool = False,
    ) -> None:
        """`refresh` in a task of its own, its failure logged.

        What asks for it returns at once. A pod or Deployment event's handler:
        Kopf keeps each event's body, and the reference cycles it builds around
        it, until the handler returns, and during a burst a refresh waits for up
        to PRECEDENCE_MAX_WAIT_S. Held that long, they reached the oldest
        garbage-collector generation. In a 1,000-model scale run (scratch, with
        gc.callbacks) full collections freed 102k objects instead of 352k-462k,
        and the operator's RSS peak was 247 MiB against 299-314. A publish that
        finds name conflicts changed: awaited one after another, its rechecks
        held every model's routes back.
        """
        if self._paused:
            return  # a late event of the paused watches (see pause)
        task = asyncio.create_task(
            self.refresh(namespace, name, fix_drift=fix_drift, fix_service=fix_service),
            name=f"status refresh of {namespace}/{name}",
        )
        self._spawned.add(task)
        task.add_done_callback(self._spawned_done)

    def _refresh_at_lapse(self, key: str, due_s: float | None) -> None:
        """Asks for a refresh of the model `key` in `due_s` seconds (None: no
        more), in place of any asked before: a replica that served and is not
        ready turns the model Degraded once the grace is over, and a sidecar
        that ran long enough after a crash loop turns it back, moments at
        which no event comes (a NotReady node's pods are marked once, a
        running sidecar writes nothing), so the status would wait up to a
        resync period for the next pass."""
        handle = self._lapses.pop(key, None)
        if handle is not None:
            handle.cancel()
        if due_s is not None:
            namespace, name = key.split("/", 1)
            self._lapses[key] = asyncio.get_running_loop().call_later(
                # Past the grace by a margin: times in the status have whole
                # seconds.
                due_s + LAPSE_MARGIN_S,
                self._lapse_due,
                namespace,
                name,
            )

    def _lapse_due(self, namespace: str, name: str) -> None:
        self._lapses.pop(f"{namespace}/{name}", None)
        self.spawn_refresh(namespace, name)

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Named for what it did: a status refresh, or an Event's post.
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancels the refreshes still running in tasks of their own, and those
        asked for later."""
        for handle in self._lapses.values():
            handle.cancel()
        self._lapses.clear()
        tasks = list(self._spawned)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _recheck(self, keys: set[str]) -> None:
        for key in keys:
            namespace, _, name = key.partition("/")
            self.spawn_refresh(namespace, name)

    def _tell_unknown_names(self, found: UnknownNames) -> None:
        """Posts, in tasks of their own (a publish waits for none), a Warning
        Event on each model of `found` naming its fallbacks or split targets
        that name no routed model: the gateway skips them, and its log is not
        where a model's owner looks. A replica paused for a peer publishes
        nothing, so tells nothing either."""
        for (key, field), unknown in found.items():
            task = asyncio.create_task(
                self._post_unknown_names(key, field, unknown),
                name=f"the {field} Event of {key}",
            )
            self._spawned.add(task)
            task.add_done_callback(self._spawned_done)

    async def _post_unknown_names(
        self, key: str, field: str, unknown: tuple[str, ...]
    ) -> None:
        namespace, _, name = key.partition("/")
        body = await self.view.model(namespace, name)
        if body is None:
            return
        try:
            model = LLMModel.from_body(body)
        except ValidationError:
            return  # unparsable: its reconcile says why
        listed = ", ".join(repr(n) for n in unknown)
        one = len(unknown) == 1
        fallbacks = field == FALLBACKS_FIELD
        await self._post(
            model,
            Notice(
                "Warning",
                UNKNOWN_FALLBACK if fallbacks else UNKNOWN_SPLIT_TARGET,
                f"spec.routing.{field}: {listed} {'names' if one else 'name'} "
                "no model the gateway routes (the servedName, an alias or an "
                "adapter of another model): "
                + (
                    f"requests skip {'it' if one else 'them'}"
                    if fallbacks
                    else f"{'its share stays' if one else 'their shares stay'} "
                    "with this model"
                )
                + " until one does; check the spelling",
            ),
        )


def status_patch(model: LLMModel, status: LLMModelStatus) -> Manifest:
    """The server-side apply body for the status subresource."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": model.name, "namespace": model.namespace},
        "status": status.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }
