"""Routes, replicas and keys from the Kubernetes API, kept current by watches.

- The `citadel-routes` ConfigMap in the gateway's namespace holds the routing
  document (key `routes.json`, or gzipped `routes.json.gz` of `binaryData` when
  large); a deleted or invalid one leaves the last good one in force (a deleted
  one counts as a reload that is `missing`).
- EndpointSlices (discovery.k8s.io/v1, label `kubernetes.io/service-name`) of every
  namespace the document names give each Service's pod addresses with their ready,
  serving and terminating conditions; one that cannot be read is logged and counts
  as gone.
- Secrets labelled `citadel.ai/api-key=true` in the gateway's namespace hold the API
  keys' records (never the keys), one key each; a deleted Secret is a revoked
  key, and so is one edited into something that is not a key record.

Each watch tells the `WatchHealth` it is given (the metrics) when it is in sync and
when it fails, by the kind of object it keeps: `ROUTES`, `ENDPOINT_SLICES`, `KEYS`.

The routing document is read in a worker thread: read on the event loop, one of
40,000 models stalled every request for about 1 s.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections import defaultdict
from typing import NamedTuple

from pydantic import ValidationError

from citadel.gateway.kube.client import (
    KubeClient,
    Obj,
    configmaps,
    endpoint_slices,
    list_watch,
    secrets,
)
from citadel.gateway.routes import (
    CONFIGMAP_NAME,
    RoutesError,
    RoutingDocument,
    configmap_document,
    invalid_fields,
    read_document,
)
from citadel.gateway.services.auth import InMemoryKeyStore, KeyRecord
from citadel.gateway.services.catalog import Catalog, RoutingTable, routing_table
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.sources.base import (
    Unobserved,
    WatchHealth,
    keep_running,
    start_supervised,
    watch_reporter,
)
from citadel.gateway.upstream import authority

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KEY_LABEL = "citadel.ai/api-key"
KEY_NAME_LABEL = "citadel.ai/key-name"
KEY_DATA = "key.json"
KEY_SECRET_PREFIX = "citadel-key-"

ROUTES = "routes"
"""The resource label of the routes ConfigMap's watch."""
ENDPOINT_SLICES = "endpointslices"
"""The resource label of the EndpointSlice watches (one per namespace)."""
KEYS = "secrets"
"""The resource label of the key Secrets' watch."""

_MALFORMED = (AttributeError, IndexError, KeyError, TypeError, ValueError)
"""What reading an object of an unexpected shape raises (a field of another
type, one missing): the object is skipped, logged, rather than end its watch."""


def _object_name(obj: Obj) -> str | None:
    """An object's metadata.name, or None when it has none."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


def slice_endpoints(slice_: Obj) -> list[Endpoint]:
    """The endpoints of one EndpointSlice, as `http://address:port` URLs."""
    ports = slice_.get("ports") or []
    http = [p for p in ports if p.get("name") == "http"] or ports
    port = http[0].get("port") if http else None
    if port is None:
        return []
    result = []
    for endpoint in slice_.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses:
            continue
        address = addresses[0]
        if not isinstance(address, str):
            raise TypeError(f"an address that is not a string: {address!r}")
        cond = endpoint.get("conditions") or {}
        ready = cond.get("ready") is not False  # unset means ready
        serving = cond.get("serving", ready) is not False
        terminating = cond.get("terminating") is True
        uid = (endpoint.get("targetRef") or {}).get("uid")
        pod = uid if isinstance(uid, str) and uid else None
        url = f"http://{authority(address, port)}"
        result.append(Endpoint(url, ready, serving, terminating, pod))
    return result


def _service_of(slice_: Obj) -> str | None:
    labels = slice_.get("metadata", {}).get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL)
    return service if isinstance(service, str) and service else None


class _Slice(NamedTuple):
    """What the view keeps of one EndpointSlice: read once, when it comes."""

    service: str | None
    endpoints: list[Endpoint]


class _SliceView:
    """The EndpointSlices of one namespace, pushed to the catalog per Service:
    only the Service an event is about, and only Services the routing document
    names (every Service of the namespace has slices).

    Args:
        namespace: the namespace watched.
        catalog: where addresses go.
        routed: the Services the document names in `namespace`.
    """

    def __init__(self, namespace: str, catalog: Catalog, routed: set[str]) -> None:
        self._namespace = namespace
        self._catalog = catalog
        self._routed = routed
        self._slices: dict[str, _Slice] = {}
        self._by_service: dict[str, set[str]] = defaultdict(set)

    def sync(self, items: list[Obj]) -> None:
        self._slices.clear()
        self._by_service.clear()
        for item in items:
            name = self._name(item)
            if name is not None:
                self._keep(name, item)
        pushed = {svc for ns, svc in self._catalog.services() if ns == self._namespace}
        for service in pushed | self._routed:
            self._push(service)

    def event(self, kind: str, obj: Obj) -> None:
        name = self._name(obj)
        if name is None:
            return
        touched = {self._forget(name)}
        if kind != "DELETED":
            touched.add(self._keep(name, obj))
        for service in touched:
            if service is not None:
                self._push(service)

    def _name(self, item: Obj) -> str | None:
        name = _object_name(item)
        if name is None:
            log.error(
                "ignoring an EndpointSlice without a name",
                extra={"namespace": self._namespace},
            )
        return name

    def _keep(self, name: str, item: Obj) -> str | None:
        """Holds a slice; its Service, if it names one. One that cannot be
        read is not held (as if deleted): a gateway started now would skip it
        too, and one bad slice must not stop the watch of the namespace."""
        try:
            held = _Slice(_service_of(item), slice_endpoints(item))
        except _MALFORMED as err:
            log.error(
                "ignoring a malformed EndpointSlice",
                extra={"slice": f"{self._namespace}/{name}", "error": repr(err)},
            )
            return None
        self._slices[name] = held
        if held.service is not None:
            self._by_service[held.service].add(name)
        return held.service

    def _forget(self, name: str) -> str | None:
        """Drops a slice; the Service it was of, if any."""
        old = self._slices.pop(name, None)
        service = old.service if old is not None else None
        if service is not None:
            names = self._by_service[service]
            names.discard(name)
            if not names:
                del self._by_service[service]
        return service

    def route(self, routed: set[str]) -> None:
        """The document now names `routed` in this namespace."""
        changed = routed ^ self._routed
        self._routed = routed
        for service in changed:
            self._push(service)

    def _push(self, service: str) -> None:
        endpoints: list[Endpoint] = []
        if service in self._routed:
            for name in self._by_service.get(service, ()):
                endpoints.extend(self._slices[name].endpoints)
        self._catalog.set_endpoints(self._namespace, service, endpoints)


class _Routes(NamedTuple):
    """A routes ConfigMap made ready to put in force."""

    table: RoutingTable
    routed: dict[str, set[str]]
    """The Services the document names, by namespace."""


def _read_routes(configmap: Obj, previous: RoutingDocument | None) -> _Routes:
    """The document a routes ConfigMap holds, made ready to put in force after
    `previous` (pure: it runs in a worker thread).

    Raises:
        RoutesError: the ConfigMap holds no usable document.
    """
    table = routing_table(read_document(configmap_document(configmap)), previous)
    return _Routes(table, _routed(table.document))


def _routed(doc: RoutingDocument) -> dict[str, set[str]]:
    routed: dict[str, set[str]] = defaultdict(set)
    for route in doc.models:
        routed[route.namespace].add(route.service)
    return routed


class RoutesWatchSource:
    """Watches the routes ConfigMap and the EndpointSlices it points at.

    Args:
        client: the API client.
        namespace: the ConfigMap's namespace.
        catalog: where routes and addresses go.
        health: told how each watch fares.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        catalog: Catalog,
        health: WatchHealth | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._catalog = catalog
        self._health = health or Unobserved()
        self._slice_watches: dict[str, asyncio.Task[None]] = {}
        self._views: dict[str, _SliceView] = {}
        # How many ConfigMaps were offered: of reads that overlap, only the
        # last one offered counts, whichever ends last.
        self._offered = 0

    async def run(self) -> None:
        params = {"fieldSelector": f"metadata.name={CONFIGMAP_NAME}"}
        try:
            await keep_running(
                lambda: list_watch(
                    self._client,
                    configmaps(self._namespace),
                    params,
                    self._sync,
                    self._event,
                    watch_reporter(self._health, ROUTES, self._namespace),
                ),
                f"routes ConfigMap {self._namespace}/{CONFIGMAP_NAME}",
            )
        finally:
            for task in self._slice_watches.values():
                task.cancel()

    async def _sync(self, items: list[Obj]) -> None:
        for item in items:
            await self._load(item)
        if not items and self._catalog.loaded:
            # Deleted while the watch was down: seen only in the list after.
            self._lost()

    async def _event(self, kind: str, obj: Obj) -> None:
        if kind == "DELETED":
            self._lost()
            return
        await self._load(obj)

    def _lost(self) -> None:
        # Routes and replicas stay current to the last document: the operator
        # writes it again (at the latest at its periodic resync), and every
        # gateway turning unready, or dropping its routes, meanwhile would take
        # the whole API down. The reload gauge drops, for the alert. A read
        # still under way is of a ConfigMap deleted since: it must not count.
        self._offered += 1
        self._catalog.lose_document(f"routes ConfigMap deleted: {CONFIGMAP_NAME}")

    async def _load(self, configmap: Obj) -> None:
        self._offered += 1
        offered = self._offered
        read: _Routes | RoutesError
        try:
            # Everything but the swap, in a worker thread: requests in flight
            # go on meanwhile (the GIL is shared, but handed over every 5 ms).
            read = await asyncio.to_thread(
                _read_routes, configmap, self._catalog.document
            )
        except RoutesError as err:
            read = err
        if offered != self._offered:
            # A newer ConfigMap (or its deletion) came while this one was read:
            # its outcome is the one that counts, put in force and reported.
            return
        if isinstance(read, RoutesError):
            self._catalog.reject_document(read)
            return
        # From here on, no await: the document and its watches change at once.
        doc = self._catalog.put_in_force(read.table)
        routed = read.routed if doc is read.table.document else _routed(doc)
        self._watch_namespaces(routed)

    def _watch_namespaces(self, routed: dict[str, set[str]]) -> None:
        for gone in self._slice_watches.keys() - routed.keys():
            self._slice_watches.pop(gone).cancel()
            del self._views[gone]
            self._catalog.forget_namespace(gone)
            self._health.watch_stopped(ENDPOINT_SLICES, gone)
        for namespace, services in routed.items():
            if namespace in self._views:
                self._views[namespace].route(services)
                continue
            view = self._views[namespace] = _SliceView(
                namespace, self._catalog, services
            )
            name = f"EndpointSlices of {namespace}"
            # Started again if it dies anyway: left in the dict, a dead watch
            # froze the namespace's replicas until it left the document.
            self._slice_watches[namespace] = start_supervised(
                keep_running(
                    functools.partial(self._watch_slices, namespace, view), name
                ),
                name,
            )

    async def _watch_slices(self, namespace: str, view: _SliceView) -> None:
        await list_watch(
            self._client,
            endpoint_slices(namespace),
            {"labelSelector": SERVICE_NAME_LABEL},
            view.sync,
            view.event,
            watch_reporter(self._health, ENDPOINT_SLICES, namespace),
        )


def key_secret(record: KeyRecord, namespace: str, name: str | None = None) -> Obj:
    """The Secret that stores a key's record.

    Args:
        record: the key's record.
        namespace: the Secret's namespace.
        name: the Secret's name; by default `citadel-key-<key name>`, the one
            `citadel keys create` makes (a rotation's new key needs another, as
            the old Secret may stay a while).
    """
    data = record.model_dump_json(by_alias=True).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name or KEY_SECRET_PREFIX + record.name,
            "namespace": namespace,
            "labels": {
                KEY_LABEL: "true",
                KEY_NAME_LABEL: record.name,
                "app.kubernetes.io/part-of": "citadel",
            },
        },
        "data": {KEY_DATA: base64.b64encode(data).decode()},
    }


def key_from_secret(secret: Obj) -> KeyRecord | None:
    """The key record in a Secret, or None (logged) when it is not one."""
    data = secret.get("data")
    raw = data.get(KEY_DATA) if isinstance(data, dict) else None
    name = _object_name(secret)
    try:
        return KeyRecord.model_validate_json(base64.b64decode(raw or ""))
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is one
        # TypeError: a value that is not a string (base64 of it fails so).
        # Its fields, not its values: a key may sit where its hash belongs. Bad
        # base64 says nothing of what it held.
        why = (
            invalid_fields(err, "record")
            if isinstance(err, ValidationError)
            else str(err)
        )
        log.error(
            "ignoring a malformed key Secret", extra={"secret": name, "error": why}
        )
        return None


def _secret_name(obj: Obj) -> str:
    return _object_name(obj) or ""


class KeySecretsSource:
    """Watches the key Secrets; a deleted Secret revokes its key at once, and so
    does one edited into something that is not a key record.

    The store is keyed by Secret: each Secret's record is a key of its own, so
    the keys in force are those of the Secrets present whatever order their
    events came in, as in a gateway started now. Two Secrets whose records share
    a key name are two keys of that name, each working until its own Secret
    goes (a hand-made rotation): refusing one of them would need an order
    between Secrets, and the one refused would start working when the other
    is deleted, a revocation that brings a key to life.

    Args:
        client: the API client.
        namespace: the Secrets' namespace.
        store: where the key records go.
        health: told how the watch fares.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        store: InMemoryKeyStore,
        health: WatchHealth | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._store = store
        self._health = health or Unobserved()

    async def run(self) -> None:
        await keep_running(
            lambda: list_watch(
                self._client,
                secrets(self._namespace),
                {"labelSelector": f"{KEY_LABEL}=true"},
                self._sync,
                self._event,
                watch_reporter(self._health, KEYS, self._namespace),
            ),
            f"key Secrets of {self._namespace}",
        )

    def _sync(self, items: list[Obj]) -> None:
        held = {}
        for item in items:
            record = key_from_secret(item)
            if record is not None:
                held[_secret_name(item)] = record
        self._store.hold_all(held)
        log.info("keys loaded", extra={"keys": len(held)})

    def _event(self, kind: str, obj: Obj) -> None:
        secret = _secret_name(obj)
        record = None if kind == "DELETED" else key_from_secret(obj)
        # What a Secret deleted or made unreadable takes away is the record it
        # held, whatever its labels say.
        before = self._store.hold(secret, record)
        if before is None or record is not None:
            return  # it held no key, or holds one still (perhaps another)
        if kind == "DELETED":
            # A copy of the Secret (the same record) may keep the key working.
            gone = self._store.lookup(before.hash) is None
            said = "key revoked" if gone else "key Secret deleted; a copy holds it"
            log.info(said, extra={"key": before.name, "secret": secret})
        else:
            # Edited into something unreadable: the key stops working, as it
            # would in a gateway started now (`_sync` skips it), rather than
            # keep the record the edit meant to change (perhaps to narrow it)
            # on the gateways that saw it before.
            log.error(
                "key disabled until its Secret is mended",
                extra={"key": before.name, "secret": secret},
            )
