"""Has an owned object drifted from what the operator applied?"""

from __future__ import annotations

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


def covers(actual: Any, desired: Any) -> bool:
    """True when `actual` holds everything in `desired`.

    Maps may carry extra keys (defaults the API server filled in); lists must have
    the same length, item by item; scalars compare as strings so `8` equals "8".
    """
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            key in actual and covers(actual[key], value)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    if isinstance(desired, bool) or isinstance(actual, bool):
        return actual is desired
    return str(actual) == str(desired)


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
    return not (covers(actual.get("metadata", {}), meta) and covers(actual, body))
