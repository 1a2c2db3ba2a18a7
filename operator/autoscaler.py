"""The autoscaler: sizes each model with spec.autoscaling by the gateways' demand.

Every `autoscale_interval_seconds` it reads every gateway's requests per model
(gateways.py), keeps each autoscaled model's recent demand, and writes the
replica count `autoscale.decide` gives through the model's scale subresource,
as a HorizontalPodAutoscaler would: the reconcile that the change sets off does
the rest (the Deployment, ScaledToZero, the PDB).

A model that a HorizontalPodAutoscaler sizes too (its scaleTargetRef names the
LLMModel) is left to it: two writers of one spec.replicas would undo each other
at every tick, each scale a rollout of GPU pods. The autoscaler says so once
(an `AutoscalingConflict` Event) and writes nothing for it until the HPA goes;
it lists each namespace's HPAs at most every `HPA_RECHECK_S`.

Only the active replica acts (`active`): one standing by for a peer reads and
writes nothing, and forgets what it saw, so that once it takes over its first
scale-down waits a whole delay of its own readings. Every write carries the
model's resourceVersion as read: a model changed since (by a person, or a copy
that a resumed replica has not listed again yet) refuses it, and the next tick
decides again from the new copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from citadel.operator import names
from citadel.operator.autoscale import Decision, DemandTrack, Sample, decide_on
from citadel.operator.events import Notice, event_object
from citadel.operator.gateways import Demand, Reading
from citadel.operator.kube.client import ApiError, Kube, Manifest
from citadel.operator.kube.resources import HPAS, LLMMODELS
from citadel.operator.metrics import DEMAND_STATES, Metrics
from citadel.operator.model import LLMModel
from citadel.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
AUTOSCALED = "Autoscaled"
AUTOSCALING_BLIND = "AutoscalingBlind"
AUTOSCALING_CONFLICT = "AutoscalingConflict"
HPA_RECHECK_S = 30.0
"""How long one listing of a namespace's HorizontalPodAutoscalers is used: an
HPA made or deleted is seen within that (a list per namespace with autoscaled
models, where reading them every tick would be one every 2 s)."""


def utc_now() -> str:
    """The time now as an Event timestamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class GatewayReader(Protocol):
    """Reads the gateways' demand (gateways.Gateways)."""

    async def read(self) -> Reading:
        """One read of every gateway."""
        ...

    async def close(self) -> None:
        """Releases its connections."""
        ...


ModelSource = Callable[[], Awaitable[list[Manifest]]]


def hpa_sizers(hpas: list[Manifest]) -> dict[str, tuple[str, ...]]:
    """The HorizontalPodAutoscalers of one namespace that size an LLMModel, by
    the model's name (sorted names of the HPAs; any version of the API group,
    as the scale subresource is the same)."""
    found: dict[str, list[str]] = {}
    for hpa in hpas:
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        group = str(ref.get("apiVersion", "")).split("/", 1)[0]
        if ref.get("kind") != names.KIND or group != names.GROUP:
            continue
        found.setdefault(str(ref.get("name", "")), []).append(
            str(hpa.get("metadata", {}).get("name", ""))
        )
    return {model: tuple(sorted(hpa_names)) for model, hpa_names in found.items()}


def conflict_message(hpa_names: tuple[str, ...]) -> str:
    """The AutoscalingConflict Event's message."""
    if len(hpa_names) == 1:
        who = f"HorizontalPodAutoscaler {hpa_names[0]} also sizes"
    else:
        who = f"HorizontalPodAutoscalers {', '.join(hpa_names)} also size"
    return (
        f"{who} this model through its scale subresource: spec.autoscaling is "
        "not applied while it does (delete the HPA, or spec.autoscaling)"
    )


@dataclass(frozen=True)
class _HpaListing:
    """One namespace's HPAs as last listed."""

    at: float
    sizers: dict[str, tuple[str, ...]]


@dataclass
class _Tracked:
    """What the autoscaler keeps of one model between ticks."""

    uid: str
    track: DemandTrack
    """Its samples, as the decision needs them (since first seen, or last
    scaled)."""
    blind_told: bool = False
    """An AutoscalingBlind Event was posted since the gateways last answered."""
    conflict: tuple[str, ...] = ()
    """The HPAs an AutoscalingConflict Event named, while they size the model."""


class Autoscaler:
    """Sizes the autoscaled models, one tick at a time.

    Args:
        kube: writes the scale and posts Events.
        settings: the interval and the window.
        metrics: the demand read and the scales written.
        models: lists the models (the reconciler's view).
        active: whether this replica is the one that acts (not standing by
            for a peer).
        gateways: reads the demand.
        clock: monotonic seconds.
        wall: the time for Events.
    """

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        metrics: Metrics,
        *,
        models: ModelSource,
        active: Callable[[], bool],
        gateways: GatewayReader,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = utc_now,
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._metrics = metrics
        self._models = models
        self._active = active
        self._gateways = gateways
        self._clock = clock
        self._wall = wall
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._hpas: dict[str, _HpaListing] = {}
        self._hpas_unread: set[str] = set()
        """Namespaces whose HPAs could not be listed, told once in the log."""

    async def run(self) -> None:
        """Ticks until cancelled; a failed tick is logged and the next one comes."""
        try:
            while True:
                try:
                    await self.tick()
                except ApiError as err:
                    log.warning("autoscaling: could not list the models: %s", err)
                except Exception:
                    log.exception("autoscaling tick failed")
                await asyncio.sleep(self._settings.autoscale_interval_seconds)
        finally:
            await self._gateways.close()

    def _forget(self, keep: set[tuple[str, str]]) -> None:
        namespaces = {namespace for namespace, _ in keep}
        for namespace in set(self._hpas) - namespaces:
            del self._hpas[namespace]
        for key in set(self._tracked) - keep:
            del self._tracked[key]
            for state in DEMAND_STATES:
                with contextlib.suppress(KeyError):  # never read: no series
                    self._metrics.demand.remove(*key, state)

    def _autoscaled(self, bodies: list[Manifest]) -> list[tuple[LLMModel, Manifest]]:
        found = []
        for body in bodies:
            meta = body.get("metadata", {})
            if meta.get("deletionTimestamp"):
                continue  # never scale a model on its way out
            if not (body.get("spec") or {}).get("autoscaling"):
                continue
            if not self._settings.watches(str(meta.get("namespace", ""))):
                continue
            try:
                model = LLMModel.from_body(body)
            except ValueError as err:
                log.warning("autoscaling: skipping unparsable LLMModel: %s", err)
                continue
            found.append((model, body))
        return found

    async def tick(self) -> None:
        """Reads the gateways once and sizes every autoscaled model."""
        if not self._active():
            self._forget(set())
            return
        models = self._autoscaled(await self._models())
        self._forget({(m.namespace, m.name) for m, _ in models})
        if not models:
            return  # nothing to size: no gateway is read
        reading = await self._gateways.read()
        now = self._clock()
        for model, body in models:
            sizers = await self._sizers(model.namespace, now)
            await self._size(model, body, reading, now, sizers.get(model.name, ()))

    async def _sizers(self, namespace: str, now: float) -> dict[str, tuple[str, ...]]:
        """The namespace's HPAs that size LLMModels (`hpa_sizers`), listed at
        most every `HPA_RECHECK_S`. A listing that fails keeps the last one
        (a 500 or a timeout must not let the autoscaler write a model an HPA
        sizes: the two would fight until the next listing), and the next tick
        lists again; none known when none ever was (no grant for them, say):
        the autoscaler then acts as before it looked."""
        listing = self._hpas.get(namespace)
        if listing is not None and now - listing.at < HPA_RECHECK_S:
            return listing.sizers
        try:
            sizers = hpa_sizers(await self._kube.list(HPAS, namespace))
        except ApiError as err:
            if namespace not in self._hpas_unread:
                log.warning(
                    "autoscaling: could not list the HorizontalPodAutoscalers "
                    "of %s (one sizing an autoscaled model would fight the "
                    "autoscaler unseen): %s",
                    namespace,
                    err,
                )
            self._hpas_unread.add(namespace)
            return listing.sizers if listing is not None else {}
        self._hpas_unread.discard(namespace)
        self._hpas[namespace] = _HpaListing(now, sizers)
        return sizers

    def _track(self, model: LLMModel, now: float) -> _Tracked:
        key = (model.namespace, model.name)
        tracked = self._tracked.get(key)
        if tracked is None or tracked.uid != model.uid:
            tracked = self._tracked[key] = _Tracked(
                model.uid,
                DemandTrack(now, self._settings.autoscale_window_seconds),
            )
        return tracked

    async def _size(
        self,
        model: LLMModel,
        body: Manifest,
        reading: Reading,
        now: float,
        sizers: tuple[str, ...],
    ) -> None:
        scaling = model.spec.autoscaling
        assert scaling is not None
        tracked = self._track(model, now)
        if reading.answered == 0:
            tracked.track.add(Sample(now, None))
            if not tracked.blind_told:
                tracked.blind_told = True
                await self._post(
                    model,
                    Notice(
                        "Warning",
                        AUTOSCALING_BLIND,
                        "no gateway could be read, replicas left as they are: "
                        + "; ".join(reading.failures),
                    ),
                )
        else:
            tracked.blind_told = False
            demand = reading.demand.get((model.namespace, model.name), Demand())
            for state, value in zip(
                DEMAND_STATES,
                (demand.in_flight, demand.waiting, demand.queued),
                strict=True,
            ):
                self._metrics.demand.labels(model.namespace, model.name, state).set(
                    value
                )
            tracked.track.add(
                Sample(now, demand.total, demand.waiting, not reading.failures)
            )
        if sizers:
            # Its demand is still kept: once the HPA goes, a scale-down waits
            # for the delay's worth of it, not for a new history.
            if tracked.conflict != sizers:
                tracked.conflict = sizers
                await self._post(
                    model,
                    Notice("Warning", AUTOSCALING_CONFLICT, conflict_message(sizers)),
                )
            return
        tracked.conflict = ()
        # A decision is a change (`decide_on` gives None at maxReplicas).
        decision = decide_on(model.spec.replicas, scaling, tracked.track)
        if decision is not None:
            await self._scale(model, body, decision, tracked, now)

    async def _scale(
        self,
        model: LLMModel,
        body: Manifest,
        decision: Decision,
        tracked: _Tracked,
        now: float,
    ) -> None:
        patch: dict[str, Any] = {
            "metadata": {"resourceVersion": body["metadata"].get("resourceVersion")},
            "spec": {"replicas": decision.replicas},
        }
        try:
            await self._kube.merge_patch(
                LLMMODELS, model.name, model.namespace, patch, subresource="scale"
            )
        except ApiError as err:
            if err.status in (404, 409):
                # Deleted, or changed since it was read: the next tick decides
                # from the new copy.
                log.info("%s: scale not written: %s", model.key, err)
            else:
                log.warning("%s: could not write the scale: %s", model.key, err)
            return
        log.info("%s: %s", model.key, decision.message)
        tracked.track.scaled(now)
        direction = "up" if decision.replicas > model.spec.replicas else "down"
        self._metrics.scales.labels(direction=direction).inc()
        await self._post(model, Notice("Normal", AUTOSCALED, decision.message))

    async def _post(self, model: LLMModel, notice: Notice) -> None:
        try:
            await self._kube.create(event_object(model, notice, self._wall()))
        except ApiError as err:
            log.warning(
                "could not post event %s for %s: %s", notice.reason, model.key, err
            )
