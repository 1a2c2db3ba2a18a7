"""The routing ConfigMap: one document, rebuilt from every LLMModel, one writer.

Several models share the ConfigMap, so it is never patched per model: a single
publisher task lists all models and writes the whole document (server-side apply,
a no-op when nothing changed). Changes within `route_publish_delay` are coalesced,
and writes are at least `route_publish_interval` apart.
A served name, alias or adapter name claimed by two models goes to the older
one; the newer is left out of the document and told why in its status. A model
whose Service is not its own (see `service_taken`) is left out too, though it
keeps its names.

Only the active replica writes: one paused for a peer (`RoutePublisher.pause`)
writes nothing, retries included, and one that resumes rewrites the document once
its models are listed again, even if it looks unchanged to it, since the peer's, or
a stale write's, may be there instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from citadel.gateway.routes import (
    CONFIGMAP_GZIP_KEY,
    CONFIGMAP_KEY,
    ModelRoute,
    RouteLimits,
    RoutingDocument,
    SplitTarget,
    UnknownNames,
    configmap_content,
    unknown_names,
)
from citadel.operator import names
from citadel.operator.kube.client import ApiError, Kube, Manifest
from citadel.operator.kube.resources import CONFIGMAPS
from citadel.operator.model import LLMModel
from citadel.operator.settings import OperatorSettings
from citadel.operator.status import (
    RECONCILE_FAILED,
    SERVICE_NAME_TAKEN,
    ConditionType,
    name_taken,
)
from citadel.operator.view import ApiView

log = logging.getLogger(__name__)
PUBLISH_BACKOFF_MAX_S = 30.0
"""The longest pause between two tries of a failing write (the alert
CitadelOperatorRoutesNotPublished expects one at least every 30 s)."""
Conflicts = dict[str, str]
"""`namespace/name` -> why the model is left out of the document."""


def route_for(model: LLMModel) -> ModelRoute:
    """The model's entry in the routing document."""
    ready = model.status.condition(ConditionType.READY)
    scaling = model.spec.autoscaling
    return ModelRoute(
        name=model.name,
        namespace=model.namespace,
        served_name=model.served_name,
        aliases=tuple(model.spec.aliases),
        adapters=tuple(a.name for a in model.spec.adapters),
        service=model.name,
        port=names.HTTP_PORT,
        strategy=model.spec.routing.strategy,
        limits=RouteLimits(rpm=model.spec.limits.rpm, tpm=model.spec.limits.tpm),
        ready=ready is not None and ready.status == "True",
        ready_replicas=model.status.replicas.ready,
        # The autoscaler may take the model to zero: the gateway holds a
        # request that finds no ready replica while the autoscaler wakes one.
        scale_from_zero=scaling is not None and scaling.min_replicas == 0,
        # As listed: a name no model serves yet is the gateway's to skip.
        fallbacks=tuple(model.spec.routing.fallbacks),
        # As listed too: the gateway skips a target it cannot send to.
        split=tuple(
            SplitTarget(model=target.model, weight=target.weight)
            for target in model.spec.routing.split
        ),
        max_requests_per_replica=model.spec.routing.max_requests_per_replica,
        reserved_per_replica=model.spec.routing.reserved_per_replica,
    )


def service_taken(model: LLMModel) -> bool:
    """Whether the model failed for good because a Service of its name is not
    its own.

    Its route would name that Service, and the gateway would send the model's
    clients, their prompts and their keys' traffic, to someone else's pods. The
    model's status tells, at no cost to the publisher: the reconciler checks the
    Service first, before it writes anything, and reports a taken one with the
    Ready reason `ServiceNameTaken` (the reason, not the message, whose wording
    may change). Once a reconcile makes the model's own Service, that report
    goes, and the route comes back.
    """
    ready = model.status.condition(ConditionType.READY)
    if ready is None or ready.status != "False":
        return False
    if ready.reason == SERVICE_NAME_TAKEN:
        return True
    # Operators before the reason of its own wrote the shared one, told apart
    # by the message alone: such a status lasts past an upgrade until the
    # model's next full pass, and routing the model meanwhile is the very harm
    # this check prevents. Kept while statuses of those operators may remain.
    return ready.reason == RECONCILE_FAILED and ready.message == name_taken(
        "Service", model.name
    )


@dataclass(frozen=True)
class Entry:
    """One model as the document needs it: its route, and what orders it."""

    key: str
    """`namespace/name`."""
    order: tuple[str, str, str]
    """Older models first (creation time, then namespace and name)."""
    route: ModelRoute
    routed: bool = True
    """Whether the route goes into the document; a model left out still holds
    its names against newer models, so that they do not change hands when it
    is fixed."""

    @classmethod
    def of(cls, model: LLMModel) -> Entry:
        """The entry of a parsed model."""
        return cls(
            model.key,
            (model.created, model.namespace, model.name),
            route_for(model),
            routed=not service_taken(model),
        )


def build_document(models: Sequence[LLMModel]) -> tuple[RoutingDocument, Conflicts]:
    """The routing document for `models`, and the models left out for name clashes."""
    return assemble([Entry.of(model) for model in models])


def assemble(entries: Sequence[Entry]) -> tuple[RoutingDocument, Conflicts]:
    """The routing document from the models' entries, and the models left out for
    name clashes (those not `routed` are left out as well, but claim their names
    all the same)."""
    claimed: dict[str, str] = {}
    routes: list[ModelRoute] = []
    conflicts: Conflicts = {}
    for entry in sorted(entries, key=lambda e: e.order):
        route = entry.route
        # An adapter's name is a model name clients send, as the others are.
        claims = route.all_names
        taken = [n for n in claims if n in claimed]
        if taken:
            conflicts[entry.key] = (
                f"model name {taken[0]!r} is already served by {claimed[taken[0]]}; "
                "choose another servedName, alias or adapter name"
            )
            continue
        claimed.update(dict.fromkeys(claims, entry.key))
        if entry.routed:
            routes.append(route)
    return RoutingDocument(models=tuple(routes)), conflicts


def configmap(settings: OperatorSettings, doc: RoutingDocument) -> Manifest:
    """The ConfigMap holding `doc`: as text, or gzipped when large (the
    gateway's `configmap_content`)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": settings.routes_configmap,
            "namespace": settings.gateway_namespace,
            "labels": {
                names.LABEL_NAME: "citadel-routes",
                names.LABEL_PART_OF: "citadel",
                names.LABEL_MANAGED_BY: names.MANAGER_NAME,
            },
        },
        **configmap_content(doc),
    }


def _other_form(written: Manifest, stored: Manifest) -> list[Manifest]:
    """JSON patch operations removing the document's other form from `stored`,
    the ConfigMap as an apply of `written` left it; none when it holds only the
    form written.

    Server-side apply drops a key the operator no longer applies only when no
    other field manager owns it too; the text key of the ConfigMap `ensure`
    created is also owned by that create's entry (as long as no apply changed
    it), and a text key an older operator or a person wrote may be anyone's.
    Left there beside the gzipped form, it would be a stale copy for `kubectl
    get` to show (gateways read the gzipped one first).
    """
    ops = []
    for section, key in (("data", CONFIGMAP_KEY), ("binaryData", CONFIGMAP_GZIP_KEY)):
        if key in (stored.get(section) or {}) and key not in (
            written.get(section) or {}
        ):
            ops.append({"op": "remove", "path": f"/{section}/{key}"})
    return ops


def routable(bodies: Iterable[Manifest], settings: OperatorSettings) -> list[Manifest]:
    """The models the operator handles, except those being deleted."""
    found = []
    for body in bodies:
        meta = body.get("metadata", {})
        if meta.get("deletionTimestamp"):
            continue  # on its way out: stop routing to it now
        if settings.watches(meta.get("namespace", "")):
            found.append(body)
    return found


def backoff(delay: float, err: Exception) -> float:
    """How long the publisher waits after a failed write: `delay`, or the wait
    a throttling API server asked for (Retry-After) if longer, up to
    PUBLISH_BACKOFF_MAX_S either way, so that a write that keeps failing is
    tried, and counted, at least that often."""
    asked = err.retry_after_s if isinstance(err, ApiError) else None
    return min(max(delay, asked or 0.0), PUBLISH_BACKOFF_MAX_S)


ConflictsChanged = Callable[[set[str]], Awaitable[None]]
ModelSource = Callable[[], Awaitable[list[Manifest]]]

CATCH_UP_MIN_POLL_S = 0.05
"""The shortest wait between two checks of whether a resumed replica's source
lists every model again (otherwise `route_publish_interval`)."""


def _uids(bodies: Iterable[Manifest]) -> set[str]:
    return {str(body.get("metadata", {}).get("uid", "")) for body in bodies}


class RoutePublisher:
    """Writes the routing ConfigMap after `kick()`, coalescing bursts."""

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        on_conflicts: ConflictsChanged | None = None,
        source: ModelSource | None = None,
        listing: ModelSource | None = None,
        on_unknown_names: Callable[[UnknownNames], None] | None = None,
    ) -> None:
        """Makes a publisher; `source` lists the models (default: the API server,
        in the namespaces `settings` lists), and so does `listing` (default:
        the API server), which a resumed publisher waits for `source` to catch
        up with. `on_unknown_names` hears, after a publish, of each model whose
        fallbacks or split targets that name no routed model changed to a set
        of some (`unknown_names`; a model left out of the document for a name
        clash or a Service taken is unknown too: the gateway cannot send it
        anything): once per set, again only after it changed."""
        self._kube = kube
        self._settings = settings
        self._on_conflicts = on_conflicts
        self._on_unknown = on_unknown_names
        self._unknown: UnknownNames = {}
        self._wanted = asyncio.Event()
        self._forced = False
        self._ready = asyncio.Event()
        self._ready.set()
        self._active = asyncio.Event()
        self._active.set()
        # Set by `resume`: the next write goes out even if unchanged.
        self._repair = False
        # `resume` counts up; `_writable` records the count once the source has
        # caught up with `listing` after it.
        self._resumes = self._listed = 0
        self.conflicts: Conflicts = {}
        # Whether `conflicts` holds what the models say: from a publish, or
        # derived by `conflict` before the first one.
        self._known = False
        self.published: RoutingDocument | None = None
        api = ApiView(kube, settings.list_scopes()).models
        self._source = source or api
        self._listing = listing or api
        # Each model's entry by uid, with the resourceVersion it was made at, so
        # a publish parses and routes only the models that changed since the
        # last one: with all of them done on every publish, publishing was 23% of
        # the operator's py-spy samples during the burst of 1,000 (`make bench`
        # at fe48022).
        self._entries: dict[str, tuple[str, Entry]] = {}

    def kick(self, *, force: bool = False) -> None:
        """Asks for the document to be rebuilt and written soon.

        Args:
            force: write it even when unchanged (the periodic resync asks so,
                in case the ConfigMap was changed or lost); at most once per
                `resync_seconds`.
        """
        self._forced |= force
        self._wanted.set()

    def hold(self) -> None:
        """Writes nothing until `ready()`: the source does not hold every model
        yet (Kopf's indexes before their first listing). A document built from
        them would drop the models it misses, and every gateway would answer
        404 for them. A replica that stands by for a peer is `pause()`d."""
        self._ready.clear()

    @property
    def holding(self) -> bool:
        """Whether `hold()` holds the writes back until `ready()`."""
        return not self._ready.is_set()

    @property
    def paused(self) -> bool:
        """Whether `pause()` holds the writes back."""
        return not self._active.is_set()

    def pause(self) -> None:
        """Writes nothing, and retries no failed write, until `resume()`: this
        replica stands by for a peer, which writes the document now. Kopf stops
        the handlers that kick the publisher, but not a retry already owed, nor
        a kick already made: either would write this replica's frozen document
        over the peer's (a leader cut off from the API server whose write
        failed, paused meanwhile, retried once it could reach it again)."""
        self._active.clear()

    def resume(self) -> None:
        """Writes again after `pause()` (else does nothing): once `source` holds
        every model that `listing` lists, the document is written, even if it
        is the one this replica wrote last. What the ConfigMap holds now is the
        peer's, or a write of a paused replica that was already on its way: an
        unforced write, skipped as unchanged, would leave the models that one
        dropped out until the periodic resync."""
        if self._active.is_set():
            return
        self._resumes += 1
        self._repair = True
        self._active.set()
        self._wanted.set()

    async def ensure(self) -> None:
        """Creates the ConfigMap with no model if there is none (never changes
        one): gateways wait for it, and an operator whose watched namespaces do
        not exist yet runs no handler that would write it.

        Raises:
            ApiError: the API server refused or could not be reached.
        """
        try:
            await self._kube.create(configmap(self._settings, RoutingDocument()))
        except ApiError as err:
            if err.status != 409:
                raise

    def ready(self) -> None:
        """The source holds every model: writing may start (or go on)."""
        self._ready.set()

    async def conflict(self, key: str) -> str | None:
        """Why the model `key` is left out of the document, or None.

        The conflicts the last publish found. Before the first one (an operator
        just started, or a peer that took over) they are derived from the
        models as the source shows them now, and kept as if published: the
        refreshes and resume reconciles before it reported a model left out of
        the routes as Ready, Failed again once the publish found the clash.
        Derived, not read back from the model's status as a taken Service
        is: a clash depends on the other models, which may have changed while
        no operator ran. The first publish rechecks the models whose conflict
        changed since, as any publish does; and parses no model again.

        Raises:
            ApiError: listing the models failed.
        """
        if not self._known and self._ready.is_set():
            bodies = routable(await self._source(), self._settings)
            _, conflicts = assemble(self._entries_of(bodies))
            if not self._known:  # else a publish ended meanwhile, and is newer
                self.conflicts, self._known = conflicts, True
        return self.conflicts.get(key)

    def _entries_of(self, bodies: Sequence[Manifest]) -> list[Entry]:
        entries = []
        made: dict[str, tuple[str, Entry]] = {}
        for body in bodies:
            meta = body.get("metadata", {})
            uid, version = str(meta.get("uid", "")), str(meta.get("resourceVersion"))
            known = self._entries.get(uid)
            if known is not None and known[0] == version and uid:
                entry = known[1]
            else:
                try:
                    entry = Entry.of(LLMModel.from_body(body))
                except ValueError as err:
                    log.warning("skipping unparsable LLMModel: %s", err)
                    continue
            made[uid] = (version, entry)
            entries.append(entry)
        self._entries = made
        return entries

    async def publish(self, *, force: bool = True) -> RoutingDocument:
        """Rebuilds the document from every LLMModel and writes it.

        Args:
            force: write even when the document is the one last written (the
                periodic publish does, in case the ConfigMap was changed or lost).

        Raises:
            ApiError: listing the models or writing the ConfigMap failed.
        """
        bodies = routable(await self._source(), self._settings)
        doc, conflicts = assemble(self._entries_of(bodies))
        if self.paused:
            # Paused while it listed: the peer writes now (`resume` rewrites).
            log.info("routing ConfigMap not written: paused for a peer")
            return doc
        wrote: tuple[Manifest, Manifest] | None = None
        new = doc != self.published
        if force or new:
            written = configmap(self._settings, doc)
            wrote = written, await self._kube.apply(written)
        changed = set(conflicts) ^ set(self.conflicts)
        changed |= {k for k in conflicts if self.conflicts.get(k) != conflicts[k]}
        self.conflicts, self.published, self._known = conflicts, doc, True
        # Told before the other form is dropped: the document is recorded as
        # published, so a failure there would leave them untold for good.
        if changed and self._on_conflicts is not None:
            await self._on_conflicts(changed)
        if new:
            self._tell_unknown(unknown_names(doc))
        if wrote is not None:
            await self._drop_other_form(*wrote)
        return doc

    def _tell_unknown(self, found: UnknownNames) -> None:
        """Tells the sets of unknown names in `found` that this publisher has
        not told (as sets: the same names in another order are no news); a
        publisher that starts, or resumes after a peer, has told none."""
        told = {
            k: v for k, v in found.items() if set(self._unknown.get(k, ())) != set(v)
        }
        self._unknown = found
        if told and self._on_unknown is not None:
            self._on_unknown(told)

    async def _drop_other_form(self, written: Manifest, stored: Manifest) -> None:
        """Removes the document's other form that the apply of `written` left
        in `stored` (see `_other_form`), only from the very version the apply
        made: a write since, a peer's after this replica paused, is newer and
        stays. The document is written either way, so a failure is only
        logged: the next forced write (each resync) looks again, and gateways
        read the gzipped form first meanwhile."""
        ops = _other_form(written, stored)
        if not ops or self.paused:
            return
        version = stored.get("metadata", {}).get("resourceVersion")
        test = {"op": "test", "path": "/metadata/resourceVersion", "value": version}
        try:
            await self._kube.json_patch(
                CONFIGMAPS,
                self._settings.routes_configmap,
                self._settings.gateway_namespace,
                [test, *ops],
            )
        except ApiError as err:
            log.warning(
                "routing ConfigMap written; its stale %s left for the next write: %s",
                ", ".join(op["path"] for op in ops),
                err,
            )

    async def _caught_up(self) -> bool:
        """Whether `source` holds every model that `listing` lists (False when
        listing fails)."""
        try:
            listed = _uids(routable(await self._listing(), self._settings))
        except ApiError as err:
            log.warning("could not list the models: %s", err)
            return False
        missing = listed - _uids(routable(await self._source(), self._settings))
        if missing:
            log.info("waiting for %d model(s) to be listed again", len(missing))
        return not missing

    async def _writable(self) -> None:
        """Returns once a write may go out: the source holds every model, the
        replica is not paused, and since it last resumed the source has caught
        up with `listing`.

        Kopf holds a starting operator's handlers until its indexes are listed,
        but lets those of a resumed one run while its watches list again: until
        then its indexes are as they were at the pause, and lack every model
        made since.
        """
        wait_s = max(self._settings.route_publish_interval, CATCH_UP_MIN_POLL_S)
        while True:
            await self._ready.wait()
            await self._active.wait()
            if not self._ready.is_set():
                continue
            resumes = self._resumes
            if self._listed == resumes:
                return
            if await self._caught_up():
                # Checked again from the top: a pause may have come meanwhile.
                self._listed = resumes
            else:
                await asyncio.sleep(wait_s)

    async def run(self, on_result: Callable[[bool], None] | None = None) -> None:
        """Publishes after every kick until cancelled; failures, whatever they
        are, are logged, counted and retried with backoff.

        Nothing is written without a kick, nor while paused (`pause`): a
        replica paused for a peer, whose indexes no longer change, must not
        write its old document over the active replica's (the periodic resync
        kicks with `force` instead, from a Kopf timer, which pauses with the
        replica). A failed write is retried once the replica resumes, if it
        was paused meanwhile, and then forced.
        """
        delay = 1.0
        loop = asyncio.get_running_loop()
        last = last_forced = -math.inf
        while True:
            await self._wanted.wait()
            await self._writable()
            gap = last + self._settings.route_publish_interval - loop.time()
            await asyncio.sleep(max(self._settings.route_publish_delay, gap))
            if self.paused:
                continue  # still wanted: `_writable` waits for the resume
            self._wanted.clear()
            last = loop.time()
            repair, self._repair = self._repair, False
            force = repair or (
                self._forced and last - last_forced >= self._settings.resync_seconds
            )
            self._forced = False
            try:
                await self.publish(force=force)
                if force:
                    last_forced = last
            except Exception as err:
                if isinstance(err, ApiError):
                    log.warning("could not write the routing ConfigMap: %s", err)
                else:
                    # A bug, or an answer of a shape not foreseen: the task
                    # ending here would never write the document again, and
                    # nothing would say so (no error counted, liveness fine).
                    log.exception("publishing the routes failed")
                self._forced |= force  # the retry still owes the forced write
                self._repair |= repair
                if on_result:
                    on_result(False)
                self._wanted.set()
                await asyncio.sleep(backoff(delay, err))
                delay = min(delay * 2, PUBLISH_BACKOFF_MAX_S)
            else:
                if on_result:
                    on_result(True)
                delay = 1.0
