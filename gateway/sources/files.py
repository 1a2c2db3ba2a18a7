"""Routes and keys from files, re-read when they change (outside Kubernetes).

The routing document is read in a worker thread, as in Kubernetes: read on the
event loop, one of 40,000 models stalled every request for about 1 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from citadel.gateway.routes import (
    RoutesError,
    RoutingDocument,
    invalid_fields,
    read_document,
)
from citadel.gateway.services.auth import InMemoryKeyStore, KeyRecord
from citadel.gateway.services.catalog import Catalog, RoutingTable, routing_table
from citadel.gateway.services.replicas import Endpoint

log = logging.getLogger(__name__)


class KeyFile(BaseModel):
    """The static key file: `{"keys": [KeyRecord, ...]}`."""

    model_config = ConfigDict(extra="ignore")

    keys: list[KeyRecord] = []


def read_key_file(path: Path) -> KeyFile:
    """The key file's contents; an empty one when the file does not exist."""
    if not path.exists():
        return KeyFile()
    return KeyFile.model_validate_json(path.read_bytes())


_GONE = (-1, -1, -1, -1)
"""What a FileWatcher has seen of a file that does not exist."""


class FileWatcher:
    """Awaits `load(bytes)` with a file's contents now and whenever it changes,
    one load at a time.

    Args:
        path: the file.
        load: what to do with new contents.
        period_s: how often the file's identity (device and inode: an atomic
            replace makes another file), modification time and size are checked.
        gone: what to do when the file does not exist, once each time it goes;
            None: log it as a file that cannot be read, keeping what was loaded.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[bytes], Awaitable[None]],
        period_s: float,
        gone: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._path = path
        self._load = load
        self._period = period_s
        self._gone = gone
        self._seen: tuple[int, int, int, int] | None = None

    async def check(self) -> None:
        """Loads the file if it changed since the last check."""
        try:
            stat = self._path.stat()
            # The inode too: a file replaced by one of the same size within one
            # tick of the file system's clock has the same mtime.
            seen = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return
            data = self._path.read_bytes()
        except FileNotFoundError as err:
            if self._gone is None:
                log.error(
                    "cannot read file", extra={"path": str(self._path), "error": err}
                )
            elif self._seen != _GONE:
                await self._gone()
                self._seen = _GONE
            return
        except OSError as err:
            log.error("cannot read file", extra={"path": str(self._path), "error": err})
            return
        await self._load(data)
        # Only once loaded: a load that raised is tried again by the watcher
        # started again after it, as a Kubernetes watch lists again.
        self._seen = seen

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self._period)


def routes_file_source(path: Path, catalog: Catalog, period_s: float) -> FileWatcher:
    """The routing document from a file; replicas from its `endpoints` lists.

    Replicas belong to a (namespace, service), as in Kubernetes: routes that
    name the same one must list the same endpoints, or the document is refused.
    """

    async def load(data: bytes) -> None:
        try:
            # Everything but the swap, in a worker thread: requests in flight
            # go on meanwhile. The watcher loads one file at a time, so no
            # newer document can be put in force before this one.
            read = await asyncio.to_thread(_read_routes_file, data, catalog.document)
        except RoutesError as err:
            catalog.reject_document(err)
            return
        # No await from here on: no request sees the document before its
        # replicas.
        doc = catalog.put_in_force(read.table)
        endpoints = read.endpoints if doc is read.table.document else _endpoints(doc)
        listed = {(route.namespace, route.service) for route in doc.models}
        for namespace, service in catalog.services():
            if (namespace, service) not in listed:  # a route the file dropped
                catalog.set_endpoints(namespace, service, ())
        for (namespace, service), urls in endpoints.items():
            catalog.set_endpoints(namespace, service, urls)

    return FileWatcher(path, load, period_s)


class _RoutesFile(NamedTuple):
    """A routes file made ready to put in force."""

    table: RoutingTable
    endpoints: dict[tuple[str, str], list[Endpoint]]
    """Each (namespace, Service)'s replicas."""


def _read_routes_file(data: bytes, previous: RoutingDocument | None) -> _RoutesFile:
    """The document a routes file holds, made ready to put in force after
    `previous` (pure: it runs in a worker thread).

    Raises:
        RoutesError: the file holds no usable document.
    """
    table = routing_table(read_document(data), previous)
    check_file_endpoints(table.document)
    return _RoutesFile(table, _endpoints(table.document))


def _endpoints(doc: RoutingDocument) -> dict[tuple[str, str], list[Endpoint]]:
    return {
        (route.namespace, route.service): [Endpoint(url) for url in route.endpoints]
        for route in doc.models
    }


def check_file_endpoints(doc: RoutingDocument) -> None:
    """Checks that routes naming the same (namespace, service) list the same
    endpoints: the catalog keeps one list per Service, and the last route's
    would silently serve every model that names it.

    Raises:
        RoutesError: two routes name one service with different endpoints.
    """
    seen: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}
    for route in doc.models:
        key, urls = (route.namespace, route.service), frozenset(route.endpoints)
        first, first_urls = seen.setdefault(key, (route.name, urls))
        if first_urls != urls:
            raise RoutesError(
                f"invalid routing document: models {route.namespace}/{first} and "
                f"{route.namespace}/{route.name} name the service "
                f"{route.service!r} with different endpoints; give each its own "
                "service"
            )


def keys_file_source(
    path: Path, store: InMemoryKeyStore, period_s: float
) -> FileWatcher:
    """The keys from a static key file; a file that cannot be read or parsed
    keeps the keys in force, and no file is no keys.

    No file is no keys as for a gateway started now and for `citadel keys`
    (`read_key_file`): deleting the file revokes every key, where the keys of a
    file that is there but unreadable or half-written are the last good ones.
    """

    async def load(data: bytes) -> None:
        try:
            keys = KeyFile.model_validate_json(data).keys
        except ValidationError as err:
            log.error(
                "key file rejected; keeping the keys in force",
                extra={"error": invalid_fields(err, "record")},
            )
            return
        store.replace_all(keys)
        log.info("keys loaded", extra={"keys": len(keys)})

    async def gone() -> None:
        store.replace_all(())
        log.warning("key file missing; no keys in force", extra={"path": str(path)})

    return FileWatcher(path, load, period_s, gone)
