"""Has an owned object drifted from what the operator applied?

Drift is what our next server-side apply would change: a field we set that now
holds something else, or an entry of ours gone from a list. What other field
managers add beside ours is not drift, because our apply keeps it: entries in
maps, and entries in the lists the API server merges by key (a sidecar container,
an environment variable, a volume). Treating those as drift made the operator
"revert" them at every Deployment event, posting a DriftReverted Event each time
while the apply changed nothing.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

# Fields that only the API server or controllers write; never compared.
_IGNORED_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
        "annotations",
    }
)

# The lists in a Deployment that the API server merges by key
# (x-kubernetes-list-type: map, and their x-kubernetes-list-map-keys), by field
# name: the name alone decides, since no name in a Deployment is used for lists
# of two kinds. tests/e2e/operator/test_drift.py checks this table against the
# API server's OpenAPI. A key absent from an entry takes the default the server
# gives it.
MAP_LISTS: dict[str, tuple[str, ...]] = {
    "claims": ("name",),
    "conditions": ("type",),
    "containers": ("name",),
    "env": ("name",),
    "ephemeralContainers": ("name",),
    "hostAliases": ("ip",),
    "imagePullSecrets": ("name",),
    "initContainers": ("name",),
    "ownerReferences": ("uid",),
    "ports": ("containerPort", "protocol"),
    "resourceClaims": ("name",),
    "schedulingGates": ("name",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "volumeDevices": ("devicePath",),
    "volumeMounts": ("mountPath",),
    "volumes": ("name",),
}
# Lists the server treats as sets (x-kubernetes-list-type: set); every other list
# is atomic, and our apply replaces it whole.
SET_LISTS = frozenset({"finalizers"})
_KEY_DEFAULTS = {"protocol": "TCP"}

# Maps whose values are resource quantities, and single quantity fields: the
# server stores quantities in canonical form ("0.5" comes back as "500m",
# "1024Mi" as "1Gi"), so they compare by value.
_QUANTITY_MAPS = frozenset({"requests", "limits"})
_QUANTITY_FIELDS = frozenset({"sizeLimit"})
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(\S*)$")
_EXPONENT = re.compile(r"^[eE][+-]?[0-9]+$")
_SUFFIXES = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def quantity(value: Any) -> Decimal | None:
    """The value of a Kubernetes quantity ("500m", "1Gi", "1e3", 2), or None
    when `value` is not one."""
    if isinstance(value, bool):
        return None
    match = _QUANTITY.match(str(value))
    if match is None:
        return None
    number, suffix = match.groups()
    scale = _SUFFIXES.get(suffix)
    if scale is not None:
        return Decimal(number) * scale
    if _EXPONENT.match(suffix) is None:
        return None
    try:
        return Decimal(number + suffix)
    except InvalidOperation:
        return None


def _same_quantity(actual: Any, desired: Any) -> bool:
    mine, theirs = quantity(desired), quantity(actual)
    if mine is None or theirs is None:
        return _same_scalar(actual, desired)
    return mine == theirs


def _same_scalar(actual: Any, desired: Any) -> bool:
    if isinstance(desired, bool) or isinstance(actual, bool):
        return actual is desired
    return str(actual) == str(desired)


def _entry_key(entry: Any, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    if not isinstance(entry, dict):
        return None
    return tuple(str(entry.get(k, _KEY_DEFAULTS.get(k, ""))) for k in keys)


def _covers_map_list(actual: list[Any], desired: list[Any], field: str) -> bool:
    keys = MAP_LISTS[field]
    by_key = {_entry_key(a, keys): a for a in actual}
    return all(
        (key := _entry_key(d, keys)) in by_key and covers(by_key[key], d)
        for d in desired
    )


def covers(actual: Any, desired: Any, field: str = "") -> bool:
    """True when `actual` holds everything in `desired`.

    Maps may carry extra keys (defaults the API server filled in, fields of other
    managers); lists merged by key (`MAP_LISTS`, chosen by `field`, the name the
    value sits under) and set lists must hold each desired entry, and may hold
    others; any other list must match item by item, with the same length.
    Quantities compare by value; other scalars as strings, so `8` equals "8".
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        if field in _QUANTITY_MAPS:
            return all(
                key in actual and _same_quantity(actual[key], value)
                for key, value in desired.items()
            )
        return all(
            key in actual and covers(actual[key], value, key)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(actual, list):
            return False
        if field in MAP_LISTS:
            return _covers_map_list(actual, desired, field)
        if field in SET_LISTS:
            return all(any(covers(a, d) for a in actual) for d in desired)
        return len(actual) == len(desired) and all(
            covers(a, d) for a, d in zip(actual, desired, strict=True)
        )
    if field in _QUANTITY_FIELDS:
        return _same_quantity(actual, desired)
    return _same_scalar(actual, desired)


def drifted(desired: dict[str, Any], actual: dict[str, Any] | None) -> bool:
    """True when `actual` is missing or lost something `desired` sets.

    Annotations are left out of metadata: other tools (kubectl rollout restart,
    Deployment revisions) write their own.
    """
    if actual is None:
        return True
    meta = {
        k: v
        for k, v in desired.get("metadata", {}).items()
        if k not in _IGNORED_METADATA
    }
    body = {k: v for k, v in desired.items() if k not in ("metadata", "status")}
    return not (
        covers(actual.get("metadata", {}), meta, "metadata") and covers(actual, body)
    )
