"""Has an owned object drifted from what the operator applied?

Drift is what our next server-side apply would change: a field we set that now
holds something else, or an entry of ours gone from a list. What other field
managers add beside ours is not drift, because our apply keeps it: entries in
maps, and entries in the lists the API server merges by key (a sidecar container,
an environment variable, a volume). Treating those as drift made the operator
"revert" them at every Deployment event, posting a DriftReverted Event each time
while the apply changed nothing.

`drifted` is the quick check, made from what is known of the server's rules; a
form it does not know (a default inside an atomic list, a quantity rounded to
1n) would make it report drift for ever. The reconciler therefore has the API
server confirm with a dry run of the apply (`unchanged_by`) before it acts, and
remembers a refuted check by `fingerprint` until the object or our apply changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

# What of an object's metadata our apply sets and may change: not annotations,
# which other tools (kubectl rollout restart, Deployment revisions) write too.
_COMPARED_METADATA = ("labels", "ownerReferences", "finalizers")
# A claim's annotations are ours too: its marks say who created it.
_COMPARED_METADATA_BY_KIND = {
    "PersistentVolumeClaim": (*_COMPARED_METADATA, "annotations"),
}

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
ListKeys = Mapping[str, tuple[str, ...]]
"""Field name -> the keys its entries merge by (as MAP_LISTS)."""
# MAP_LISTS for the other kinds the operator applies, where a field name keys
# differently: a Service's ports merge by port number and protocol. (Among the
# fields we set, a PodDisruptionBudget, a PersistentVolumeClaim and a PodMonitor
# hold no list merged by key.)
MAP_LISTS_BY_KIND: dict[str, ListKeys] = {
    "Service": {**MAP_LISTS, "ports": ("port", "protocol")},
}
# Lists the server treats as sets (x-kubernetes-list-type: set); every other list
# is atomic, and our apply replaces it whole.
SET_LISTS = frozenset({"finalizers"})
_KEY_DEFAULTS = {"protocol": "TCP"}

# Maps whose values are resource quantities, and single quantity fields: the
# server stores quantities in canonical form ("0.5" comes back as "500m",
# "1024Mi" as "1Gi"), so they compare by value.
_QUANTITY_MAPS = frozenset({"requests", "limits", "overhead"})
_QUANTITY_FIELDS = frozenset({"sizeLimit", "divisor"})
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
        # Exact: the default 28 digits would round long quantities together.
        with localcontext() as exact:
            exact.prec = 80
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


def _covers_map_list(
    actual: list[Any], desired: list[Any], keys: tuple[str, ...], lists: ListKeys
) -> bool:
    by_key = {_entry_key(a, keys): a for a in actual}
    return all(
        (key := _entry_key(d, keys)) in by_key and covers(by_key[key], d, lists=lists)
        for d in desired
    )


# Maps of user data, where the server keeps "" values as they are.
_STRING_MAPS = frozenset({"labels", "annotations", "nodeSelector", "matchLabels"})


def _empty(value: Any) -> bool:
    """Values the API server drops from optional fields: "", [] and {} (not
    False or 0, which it keeps)."""
    return value is None or value == "" or value == [] or value == {}


def covers(
    actual: Any,
    desired: Any,
    field: str = "",
    whole: bool = False,
    lists: ListKeys = MAP_LISTS,
) -> bool:
    """True when `actual` holds everything in `desired`.

    Maps may carry extra keys (defaults the API server filled in, fields of other
    managers); lists merged by key (`MAP_LISTS`, chosen by `field`, the name the
    value sits under) and set lists must hold each desired entry, and may hold
    others; any other list is atomic, and must match item by item, each item
    `whole`: with no keys of its own, since our apply replaces the list. `lists`
    replaces `MAP_LISTS` for a kind that keys lists differently. A desired
    empty value matches a missing one. Quantities compare by value; other scalars
    as strings, so `8` equals "8".
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        dropped = field not in _STRING_MAPS  # does the server drop empties here
        if whole and any(
            k not in desired and not (dropped and _empty(v)) for k, v in actual.items()
        ):
            return False
        quantities = field in _QUANTITY_MAPS
        for key, value in desired.items():
            if key not in actual:
                if dropped and _empty(value):
                    continue
                return False
            if quantities:
                if not _same_quantity(actual[key], value):
                    return False
            elif not covers(actual[key], value, key, whole, lists):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(actual, list):
            return False
        if not whole and field in lists:
            return _covers_map_list(actual, desired, lists[field], lists)
        if not whole and field in SET_LISTS:
            return all(any(covers(a, d, lists=lists) for a in actual) for d in desired)
        return len(actual) == len(desired) and all(
            covers(a, d, whole=True, lists=lists)
            for a, d in zip(actual, desired, strict=True)
        )
    if field in _QUANTITY_FIELDS:
        return _same_quantity(actual, desired)
    return _same_scalar(actual, desired)


def drifted(desired: dict[str, Any], actual: dict[str, Any] | None) -> bool:
    """True when `actual` is missing or lost something `desired` sets.

    Of metadata, only `_COMPARED_METADATA` counts (and a claim's annotations).
    """
    if actual is None:
        return True
    lists = MAP_LISTS_BY_KIND.get(str(desired.get("kind")), MAP_LISTS)
    return not covers(actual, _compared(desired), lists=lists)


def _compared(obj: dict[str, Any]) -> dict[str, Any]:
    """The parts of `obj` an apply of ours may change."""
    meta = obj.get("metadata", {})
    keys = _COMPARED_METADATA_BY_KIND.get(str(obj.get("kind")), _COMPARED_METADATA)
    return {
        "metadata": {k: meta[k] for k in keys if k in meta},
        **{k: v for k, v in obj.items() if k not in ("metadata", "status")},
    }


def unchanged_by(result: dict[str, Any], actual: dict[str, Any]) -> bool:
    """True when `result`, a dry run's answer to our apply, is `actual` again in
    everything but status and (but for a claim) annotations: the apply would
    change nothing."""
    return _compared(result) == _compared(actual)


def fingerprint(desired: dict[str, Any], actual: dict[str, Any]) -> str:
    """A digest of our apply and of what `unchanged_by` compares in the object:
    the same fingerprint means a dry run would give the same answer. (Not the
    object's generation: a Deployment's also moves when only its annotations do.)"""
    text = json.dumps([desired, _compared(actual)], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
