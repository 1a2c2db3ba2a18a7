"""Routes and keys from files, re-read when they change (outside Kubernetes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from citadel.gateway.routes import (
    RoutesError,
    RoutingDocument,
    invalid_fields,
    read_document,
)
from citadel.gateway.services.auth import InMemoryKeyStore, KeyRecord
from citadel.gateway.services.catalog import Catalog
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


class FileWatcher:
    """Calls `load(bytes)` with a file's contents now and whenever it changes.

    Args:
        path: the file.
        load: what to do with new contents.
        period_s: how often the file's modification time and size are checked.
    """

    def __init__(
        self, path: Path, load: Callable[[bytes], None], period_s: float
    ) -> None:
        self._path = path
        self._load = load
        self._period = period_s
        self._seen: tuple[int, int] | None = None

    def check(self) -> None:
        """Loads the file if it changed since the last check."""
        try:
            stat = self._path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return
            data = self._path.read_bytes()
        except OSError as err:
            log.error("cannot read file", extra={"path": str(self._path), "error": err})
            return
        self._load(data)
        # Only once loaded: a load that raised is tried again by the watcher
        # started again after it, as a Kubernetes watch lists again.
        self._seen = seen

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            self.check()
            await asyncio.sleep(self._period)


def routes_file_source(path: Path, catalog: Catalog, period_s: float) -> FileWatcher:
    """The routing document from a file; replicas from its `endpoints` lists.

    Replicas belong to a (namespace, service), as in Kubernetes: routes that
    name the same one must list the same endpoints, or the document is refused.
    """

    def load(data: bytes) -> None:
        try:
            reading = read_document(data).keeping(catalog.document)
            check_file_endpoints(reading.document)
        except RoutesError as err:
            catalog.reject_document(err)
            return
        # No await from here on: no request sees the document before its
        # replicas.
        doc = reading.document
        catalog.set_document(doc, reading.problems)
        listed = {(route.namespace, route.service) for route in doc.models}
        for namespace, service in catalog.services():
            if (namespace, service) not in listed:  # a route the file dropped
                catalog.set_endpoints(namespace, service, ())
        for route in doc.models:
            endpoints = [Endpoint(url) for url in route.endpoints]
            catalog.set_endpoints(route.namespace, route.service, endpoints)

    return FileWatcher(path, load, period_s)


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
    """The keys from a static key file; a bad file keeps the keys in force."""

    def load(data: bytes) -> None:
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

    return FileWatcher(path, load, period_s)
