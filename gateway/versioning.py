"""The public API's version and its deprecations, for every front door.

docs/api-versioning.md is the policy. REST reports the version in the
`x-citadel-api-version` header of every response, gRPC in the initial and
trailing metadata of every call. A deprecated REST path or gRPC method gets the
`Deprecation` and `Sunset` headers (RFC 9745, RFC 8594) or metadata entries of
the same names; GraphQL marks deprecated fields with `@deprecated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

API_VERSION = "v1"
"""The version of `/v1`, `citadel.v1` and the GraphQL schema served."""
VERSION_HEADER = "x-citadel-api-version"
DEPRECATION_HEADER = "deprecation"
SUNSET_HEADER = "sunset"
LINK_HEADER = "link"


@dataclass(frozen=True)
class Deprecation:
    """One deprecated path or method: when it was deprecated, when it goes.

    Attributes:
        since: when the deprecation was announced.
        sunset: the earliest time it may stop working.
        link: a page that says what to use instead.
    """

    since: datetime
    sunset: datetime
    link: str = "https://citadel.ai/docs/api-versioning"

    def headers(self) -> dict[str, str]:
        """The `Deprecation`, `Sunset` and `Link` headers (or gRPC metadata)."""
        return {
            DEPRECATION_HEADER: f"@{int(self.since.timestamp())}",
            SUNSET_HEADER: format_datetime(self.sunset.astimezone(UTC), usegmt=True),
            LINK_HEADER: f'<{self.link}>; rel="deprecation"',
        }


REST_DEPRECATIONS: Mapping[str, Deprecation] = {}
"""Deprecated REST paths (`/v1/...`); none in v1 yet."""
GRPC_DEPRECATIONS: Mapping[str, Deprecation] = {}
"""Deprecated gRPC methods (`/citadel.v1.Inference/...`); none yet."""


def response_headers(
    path: str, deprecations: Mapping[str, Deprecation] = REST_DEPRECATIONS
) -> list[tuple[bytes, bytes]]:
    """The raw headers every REST response for `path` gets."""
    headers = [(VERSION_HEADER.encode(), API_VERSION.encode())]
    deprecation = deprecations.get(path)
    if deprecation is not None:
        headers += [(k.encode(), v.encode()) for k, v in deprecation.headers().items()]
    return headers
