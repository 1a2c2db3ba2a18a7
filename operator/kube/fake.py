"""An in-memory `Kube` for unit tests: objects in a dict, calls recorded."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

from citadel.operator.kube.client import ApiError, Listing, Manifest, OnRefusal
from citadel.operator.kube.resources import Resource, resource_for


def _merge(base: Manifest, patch: Manifest) -> Manifest:
    """A rough stand-in for server-side apply: maps merge, everything else replaces."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _index(part: str | int) -> str | int:
    return int(part) if isinstance(part, str) and part.isdigit() else part


def _matches(obj: Manifest, selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels", {})
    pairs = (term.split("=", 1) for term in selector.split(","))
    return all(labels.get(k) == v for k, v in pairs)


class FakeKube:
    """Keeps objects by (plural, namespace, name); every write is recorded.

    Attributes:
        objects: the stored objects.
        applied: every object passed to `apply`, in order (with the subresource).
        dry_runs: the same, for dry-run applies (which store nothing).
        deleted: (plural, namespace, name) of every successful delete.
        events: every object passed to `create` (Events).
        served: resources that `has_resource` reports as installed.
        merged: (plural, namespace, name, subresource, body) of every
            `merge_patch`, refused or not.
        fail: plural -> ApiError raised by `apply`, `create` and
            `merge_patch` of that resource (and by `list_uids`); `json_patch`
            and `delete` do not read it.
        reads: (verb, plural) of every get ("get cached" with `cached`) and
            list ("list cached" for `list_uids`), in order.
        behind: (plural, namespace, name) -> what a `cached` get answers
            instead of the stored object (None: not found), as a watch cache
            behind the store would.
        on_refusal: told every ApiError the fake raises, as `AioKube` tells
            its own.

    Every write gives the object a new, growing `resourceVersion`; an apply
    that carries one is refused (409) unless it is the stored object's.
    """

    def __init__(
        self,
        objects: Iterable[Manifest] = (),
        served: Iterable[Resource] = (),
        *,
        on_refusal: OnRefusal | None = None,
    ):
        self.objects: dict[tuple[str, str, str], Manifest] = {}
        self.applied: list[tuple[str, Manifest]] = []
        self.dry_runs: list[tuple[str, Manifest]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.events: list[Manifest] = []
        self.created: list[Manifest] = []
        self.patched: list[tuple[str, str, list[Manifest]]] = []
        self.merged: list[tuple[str, str, str, str, Manifest]] = []
        self._created_owners: set[tuple[str, str, str]] = set()
        self.served = set(served)
        self.fail: dict[str, ApiError] = {}
        self._uids = itertools.count(1)
        self._versions = itertools.count(1)
        self.reads: list[tuple[str, str]] = []
        self.behind: dict[tuple[str, str, str], Manifest | None] = {}
        self.on_refusal = on_refusal
        for obj in objects:
            self.put(obj)

    def _refused(self, err: ApiError) -> ApiError:
        """`err`, once `on_refusal` has been told: what every refusal raises."""
        if self.on_refusal is not None:
            self.on_refusal(err)
        return err

    @staticmethod
    def _key(
        resource: Resource, name: str, namespace: str | None
    ) -> tuple[str, str, str]:
        return (resource.plural, namespace or "" if resource.namespaced else "", name)

    def put(self, obj: Manifest) -> Manifest:
        """Stores an object as if the API server had created it."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["resourceVersion"] = str(next(self._versions))
        resource = resource_for(obj["apiVersion"], obj["kind"])
        self.objects[self._key(resource, meta["name"], meta.get("namespace"))] = obj
        return obj

    def stored(
        self, resource: Resource, name: str, namespace: str | None = None
    ) -> Any:
        """The stored object (KeyError when absent), for assertions."""
        return self.objects[self._key(resource, name, namespace)]

    async def apply(
        self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
    ) -> Manifest:
        resource = resource_for(obj["apiVersion"], obj["kind"])
        if resource.plural in self.fail:
            raise self._refused(self.fail[resource.plural])
        (self.dry_runs if dry_run else self.applied).append(
            (subresource, copy.deepcopy(obj))
        )
        meta = obj["metadata"]
        key = self._key(resource, meta["name"], meta.get("namespace"))
        current = self.objects.get(key)
        version = meta.get("resourceVersion")
        if version is not None and (
            current is None or current["metadata"]["resourceVersion"] != version
        ):
            raise self._refused(
                ApiError(409, "Conflict", "the object has been modified")
            )
        if current is None:
            if subresource:
                raise self._refused(
                    ApiError(404, "NotFound", f"{resource.plural} {meta['name']}")
                )
            if dry_run:
                return copy.deepcopy(obj)
            return copy.deepcopy(self.put(obj))
        if subresource == "status":
            merged = {**current, "status": copy.deepcopy(obj.get("status", {}))}
        else:
            merged = _merge(current, {k: v for k, v in obj.items() if k != "status"})
            if "ownerReferences" not in meta and key not in self._created_owners:
                # Owner references the operator stops applying go, as server-side
                # apply removes fields no other manager owns; those a create set
                # stay (the create's manager entry still owns them).
                merged["metadata"] = {
                    k: v
                    for k, v in merged["metadata"].items()
                    if k != "ownerReferences"
                }
            if merged.get("spec") != current.get("spec"):
                merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
        if dry_run:
            return copy.deepcopy(merged)
        merged["metadata"] = {
            **merged["metadata"],
            "resourceVersion": str(next(self._versions)),
        }
        self.objects[key] = merged
        return copy.deepcopy(merged)

    async def json_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        operations: list[Manifest],
    ) -> Manifest:
        """Supports `test` and `remove` (what the operator sends)."""
        key = self._key(resource, name, namespace)
        if key not in self.objects:
            raise self._refused(ApiError(404, "NotFound", f"{resource.plural} {name}"))
        obj = copy.deepcopy(self.objects[key])
        for op in operations:
            *parents, last = [_index(p) for p in op["path"].split("/")[1:]]
            holder: Any = obj
            try:
                for part in parents:
                    holder = holder[part]
                if op["op"] == "test" and holder[_index(last)] != op["value"]:
                    raise self._refused(
                        ApiError(422, "Invalid", f"test failed at {op['path']}")
                    )
                if op["op"] == "remove":
                    del holder[_index(last)]
            except (KeyError, IndexError, TypeError) as err:
                refused = ApiError(422, "Invalid", f"no {op['path']}")
                raise self._refused(refused) from err
        if not obj["metadata"].get("ownerReferences"):
            obj["metadata"].pop("ownerReferences", None)
            self._created_owners.discard(key)
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = obj
        self.patched.append((resource.plural, name, copy.deepcopy(operations)))
        return copy.deepcopy(obj)

    async def merge_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        body: Manifest,
        *,
        subresource: str = "",
    ) -> Manifest:
        """Merges `body` into the object (for `scale`: its spec.replicas), with
        the resourceVersion precondition; recorded in `merged`."""
        key = self._key(resource, name, namespace)
        if resource.plural in self.fail:
            raise self._refused(self.fail[resource.plural])
        current = self.objects.get(key)
        if current is None:
            raise self._refused(ApiError(404, "NotFound", f"{resource.plural} {name}"))
        self.merged.append(
            (resource.plural, namespace or "", name, subresource, copy.deepcopy(body))
        )
        version = body.get("metadata", {}).get("resourceVersion")
        if version is not None and current["metadata"]["resourceVersion"] != version:
            raise self._refused(
                ApiError(409, "Conflict", "the object has been modified")
            )
        if subresource == "scale":
            patch = {"spec": {"replicas": body["spec"]["replicas"]}}
        else:
            patch = {k: v for k, v in body.items() if k != "metadata"}
        merged = _merge(current, patch)
        if merged.get("spec") != current.get("spec"):
            merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = merged
        return copy.deepcopy(merged)

    async def get(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        self.reads.append(("get cached" if cached else "get", resource.plural))
        key = self._key(resource, name, namespace)
        if cached and key in self.behind:
            found = self.behind[key]
            return copy.deepcopy(found) if found is not None else None
        found = self.objects.get(key)
        return copy.deepcopy(found) if found is not None else None

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> list[Manifest]:
        self.reads.append(("list", resource.plural))
        if resource.plural in self.fail:
            raise self._refused(self.fail[resource.plural])
        return [
            copy.deepcopy(obj)
            for obj in self._listed(resource, namespace, label_selector)
        ]

    def _listed(
        self, resource: Resource, namespace: str | None, label_selector: str | None
    ) -> Iterable[Manifest]:
        return (
            obj
            for (plural, ns, _), obj in sorted(self.objects.items())
            if plural == resource.plural
            and (namespace is None or ns == namespace)
            and _matches(obj, label_selector)
        )

    async def list_uids(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> Listing:
        """As of a version after every write so far, unless `fail` names the
        resource."""
        self.reads.append(("list cached", resource.plural))
        if resource.plural in self.fail:
            raise self._refused(self.fail[resource.plural])
        found = self._listed(resource, namespace, label_selector)
        return Listing(
            uids=frozenset(obj["metadata"]["uid"] for obj in found),
            resource_version=str(next(self._versions)),
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> bool:
        key = self._key(resource, name, namespace)
        found = self.objects.get(key)
        if found is None:
            return False
        if uid is not None and found["metadata"]["uid"] != uid:
            raise self._refused(
                ApiError(
                    409, "Conflict", f"Precondition failed: UID in precondition: {uid}"
                )
            )
        del self.objects[key]
        self.deleted.append(key)
        return True

    async def create(self, obj: Manifest) -> Manifest:
        if obj["kind"] == "Event":
            self.events.append(copy.deepcopy(obj))
            return obj
        resource = resource_for(obj["apiVersion"], obj["kind"])
        if resource.plural in self.fail:
            raise self._refused(self.fail[resource.plural])
        meta = obj["metadata"]
        if self._key(resource, meta["name"], meta.get("namespace")) in self.objects:
            raise self._refused(
                ApiError(409, "AlreadyExists", f"{resource.plural} {meta['name']}")
            )
        self.created.append(copy.deepcopy(obj))
        if meta.get("ownerReferences"):
            self._created_owners.add(
                self._key(resource, meta["name"], meta.get("namespace"))
            )
        return copy.deepcopy(self.put(obj))

    async def has_resource(self, resource: Resource) -> bool:
        return resource in self.served
