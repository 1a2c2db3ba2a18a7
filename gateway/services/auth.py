"""API keys: records, hashing, the key store and the checks made per request.

A key is `ctd-` followed by 43 URL-safe characters (32 random bytes). Only its
SHA-256 is stored: with that much entropy a salt adds nothing, and a plain hash lets
the gateway find a key's record in one dictionary look-up. The key itself is shown
once, at creation, and never logged.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field

from citadel.gateway.errors import AuthenticationFailed, PermissionDenied
from citadel.gateway.routes import NAME_PATTERN, ModelRoute

KEY_PREFIX = "ctd-"
HASH_PREFIX = "sha256:"

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """What a key may do: admins may call every model."""

    ADMIN = "admin"
    USER = "user"


class Priority(enum.StrEnum):
    """How a key's requests fare when their model is saturated: `sheddable`
    ones are refused (503 `model_overloaded`) while every replica of the
    model is full, so that `standard` ones keep their room (batch jobs, evals
    and other traffic that can wait, beside interactive users)."""

    STANDARD = "standard"
    SHEDDABLE = "sheddable"


class KeyRecord(BaseModel):
    """Everything stored about one key (never the key itself)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    role: Role = Role.USER
    models: tuple[str, ...] = ("*",)
    """Glob patterns (`fnmatch`) of the model names or aliases it may call; an
    adapter's name only by a pattern that matches it (`Principal.may_use`)."""
    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    daily_tokens: Annotated[int, Field(ge=1)] | None = Field(None, alias="dailyTokens")
    monthly_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, alias="monthlyTokens"
    )
    priority: Priority = Priority.STANDARD
    """The highest priority of its requests (a request may ask for a lower
    one, `x-citadel-priority`). A gateway from before priorities ignores the
    field: its keys are all standard there."""
    created: datetime | None = None
    """When the key was made; None when its record does not say (the chart's
    admin key record, one written by hand). Never filled in on reading: a
    record's copies must read the same, or the store refuses their key."""


def generate_key() -> str:
    """A new random key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's record, or nobody when auth is disabled."""

    key: KeyRecord | None

    @property
    def name(self) -> str | None:
        """The key's name (a bounded metric label), None when anonymous."""
        return self.key.name if self.key else None

    @property
    def priority(self) -> Priority:
        """The key's priority; standard when anonymous (auth disabled)."""
        return self.key.priority if self.key else Priority.STANDARD

    def may_use(self, route: ModelRoute, requested: str | None = None) -> bool:
        """True when the key may call the model `requested` names on `route`
        (None: the base model).

        An alias is the same model, so a key allowed any of the base's names
        may use all of them. An adapter is a model of its own (a tenant's
        fine-tune on the same replicas): only a pattern matching its name
        allows it, and allowing it allows neither the base nor another
        adapter.
        """
        if self.key is None or self.key.role is Role.ADMIN:
            return True
        if requested is not None and requested in route.adapters:
            names: tuple[str, ...] = (requested,)
        else:
            names = route.names
        return any(
            fnmatchcase(name, pattern) for pattern in self.key.models for name in names
        )

    def check(self, route: ModelRoute, requested: str) -> None:
        """Raises PermissionDenied unless the key may call this model."""
        if not self.may_use(route, requested):
            raise PermissionDenied(
                f"The key `{self.name}` may not use the model `{requested}`.",
                param="model",
            )


ANONYMOUS = Principal(None)


class KeyStore(Protocol):
    """Finds a key's record by its hash."""

    def lookup(self, key_hash: str) -> KeyRecord | None: ...


class InMemoryKeyStore:
    """The keys in force, each record held by one thing of a key source (a key
    Secret, an entry of the key file).

    Keyed by holder, not by key name, so that what is in force depends only on
    which holders exist, never on the order in which they came: taking one
    holder's record away revokes exactly that record's key, and two holders
    whose records share a name are two keys that both work. A key (a hash) that
    two holders give different records is refused (logged), since neither can
    be said to be the one meant; the same record held twice (a copied Secret)
    is in force while either holds it.
    """

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._held: dict[str, KeyRecord] = {}
        # A key's hash -> who holds a record of it: what an event must look at.
        self._holders: dict[str, set[str]] = {}
        self._by_hash: dict[str, KeyRecord] = {}
        self.replace_all(records)

    def lookup(self, key_hash: str) -> KeyRecord | None:
        return self._by_hash.get(key_hash)

    def replace_all(self, records: Iterable[KeyRecord]) -> None:
        """Puts exactly these records in force, each held on its own."""
        self.hold_all({f"#{i}": record for i, record in enumerate(records)})

    def hold_all(self, held: Mapping[str, KeyRecord]) -> None:
        """Puts exactly these holders' records in force (in one assignment).

        Args:
            held: holder (a Secret's name, say) -> the record it holds.
        """
        self._held = dict(held)
        self._holders = defaultdict(set)
        for holder, record in held.items():
            self._holders[record.hash].add(holder)
        in_force = ((h, self._agreed(h)) for h in self._holders)
        self._by_hash = {h: r for h, r in in_force if r is not None}

    def hold(self, holder: str, record: KeyRecord | None) -> KeyRecord | None:
        """Makes `holder` hold `record`, or nothing when it is None (a holder
        deleted, or one that no longer holds a readable record).

        Returns:
            The record it held before, if any.
        """
        before = self._held.pop(holder, None)
        if before is not None:
            self._holders[before.hash].discard(holder)
        if record is not None:
            self._held[holder] = record
            self._holders.setdefault(record.hash, set()).add(holder)
        by_hash = dict(self._by_hash)
        for key_hash in {r.hash for r in (before, record) if r is not None}:
            agreed = self._agreed(key_hash) if self._holders[key_hash] else None
            if agreed is not None:
                by_hash[key_hash] = agreed
                continue
            by_hash.pop(key_hash, None)
            if not self._holders[key_hash]:
                del self._holders[key_hash]
        self._by_hash = by_hash  # one assignment: a look-up sees before or after
        return before

    def _agreed(self, key_hash: str) -> KeyRecord | None:
        """The record of a key, or None (logged) when its holders disagree."""
        holders = self._holders[key_hash]
        records = {self._held[holder] for holder in holders}
        if len(records) == 1:
            return records.pop()
        log.error(
            "key refused: the records holding it differ",
            extra={
                "keys": sorted({r.name for r in records}),
                "holders": sorted(holders),
            },
        )
        return None

    def remove(self, name: str) -> None:
        """Revokes every key with this name."""
        self.hold_all({h: r for h, r in self._held.items() if r.name != name})

    def __len__(self) -> int:
        return len(self._by_hash)


class Authenticator:
    """Turns an `Authorization` header into a Principal.

    Args:
        store: where key records are found.
        required: False only when auth is explicitly disabled.
    """

    def __init__(self, store: KeyStore, required: bool = True) -> None:
        self._store = store
        self._required = required

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller, from `Bearer <key>`.

        Raises:
            AuthenticationFailed: no key, or an unknown or revoked one.
        """
        if not self._required:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as "
                "`Authorization: Bearer <key>`."
            )
        digest = hash_key(key)
        record = self._store.lookup(digest)
        # compare_digest: the look-up found it by hash; make the final check
        # constant-time all the same.
        if record is None or not hmac.compare_digest(record.hash, digest):
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(record)
