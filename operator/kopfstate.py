"""Kopf's handling state kept in the operator's memory, not on the LLMModels.

Kopf remembers, per object, the spec it last handled (to tell an update from a
status write) and each handler's progress (retries). Its stock storages keep both
in annotations, which costs a PATCH of every new LLMModel after its first
reconcile, one more watch event that everybody watching models receives, and a
copy of the spec in every later read and event of that model. At 300 models that
PATCH was about one request in twelve of the operator's own (apiserver_request_total
in a scratch run before this module; docs/benchmarks.md has the requests after).

Nothing here needs to outlive the process: every handler of an LLMModel runs the
same idempotent reconcile, so an operator that starts without this state (a
restart, or a peer taking over) handles every model as new, once, exactly as
Kopf's resume handlers would. The one thing still written to the object is
Kopf's "touch" annotation, which wakes the object up after a retry delay.

Entries go when the model's DELETED event arrives; a model deleted while this
operator was paused for a peer sends none, and its entry (a spec, a few hundred
bytes) stays until the operator restarts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import kopf

from citadel.operator.names import KIND, KOPF_PREFIX

# What Kopf accepts as a field: a dotted path, or its parts.
FieldSpec = str | tuple[str, ...] | list[str] | None


GENERATION = "metadata.generation"


class MemoryDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The last handled essence of each object, by uid, in memory.

    Essences are built as the annotation storage builds them (our annotations
    left out), so objects that still carry an annotation from an older operator
    compare the same.
    """

    def __init__(self) -> None:
        super().__init__(prefix=KOPF_PREFIX, key="last-handled-configuration")
        self._essences: dict[str, kopf.BodyEssence] = {}

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        # Kopf builds an essence for every event of every watched resource, but
        # compares them only for resources with change, timer or daemon
        # handlers: LLMModels, and the peering object (whose daemon needs no
        # essence: it only hears of pauses). Copying the spec of each pod and
        # Deployment event for nothing was 6% of the operator's py-spy samples
        # at 1,000 models.
        if body.get("kind", KIND) != KIND:
            return cast(kopf.BodyEssence, {})
        # Kopf deep-copies the whole body and then drops all but the spec, labels
        # and annotations; copying the status and managedFields first was 8% of
        # the operator's CPU at 300 models (py-spy).
        # The generation is part of the essence: a spec changed and changed back
        # (A -> B -> A while the model waited, or an update that failed and was
        # undone before its retry) leaves the same spec, so Kopf would see
        # nothing to handle, but generation B was never reconciled and the
        # refreshes wait for that (Reconciler.refresh).
        extra = [*(extra_fields or ()), GENERATION]
        if extra_fields:
            return super().build(body=body, extra_fields=extra)
        meta = body.get("metadata", {})
        kept = ("name", "namespace", "uid", "labels", "annotations", "generation")
        lean = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {k: meta[k] for k in kept if k in meta},
            "spec": body.get("spec", {}),
        }
        return super().build(
            body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra
        )

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self._essences.get(body.metadata.uid or "")

    def store(
        self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence
    ) -> None:
        uid = body.metadata.uid
        if uid:
            self._essences[uid] = essence

    def forget(self, uid: str) -> None:
        """Drops a deleted object's essence."""
        self._essences.pop(uid, None)

    def __len__(self) -> int:
        return len(self._essences)


class MemoryProgress(kopf.AnnotationsProgressStorage):
    """Each handler's progress (started, retries, delay), by uid, in memory.

    Only `touch` still patches the object, as the annotation storage does: Kopf
    uses it to get a fresh event once a retry's delay is over.
    """

    def __init__(self) -> None:
        super().__init__(prefix=KOPF_PREFIX)
        self._records: dict[str, dict[str, kopf.ProgressRecord]] = {}

    def fetch(
        self, *, key: kopf.HandlerId, body: kopf.Body
    ) -> kopf.ProgressRecord | None:
        return self._records.get(body.metadata.uid or "", {}).get(key)

    def store(
        self,
        *,
        key: kopf.HandlerId,
        record: kopf.ProgressRecord,
        body: kopf.Body,
        patch: kopf.Patch,
    ) -> None:
        uid = body.metadata.uid
        if uid:
            self._records.setdefault(uid, {})[key] = record

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        records = self._records.get(body.metadata.uid or "")
        if records is not None:
            records.pop(key, None)
            if not records:
                del self._records[body.metadata.uid or ""]

    def forget(self, uid: str) -> None:
        """Drops a deleted object's records."""
        self._records.pop(uid, None)

    def __len__(self) -> int:
        return len(self._records)


class MemoryState:
    """Both storages, and one place to forget a deleted object."""

    def __init__(self) -> None:
        self.diffbase = MemoryDiffBase()
        self.progress = MemoryProgress()

    def forget(self, uids: Iterable[str]) -> None:
        """Drops what is kept for these (deleted) objects."""
        for uid in uids:
            self.diffbase.forget(uid)
            self.progress.forget(uid)
