"""The one place where gateway errors become GraphQL errors.

A GraphQL error carries REST's error object in its `extensions`: `code`, `type`,
`param`, the HTTP `status` REST would answer with, and for errors that say when
to retry `retryAfter` (whole seconds, a number), with the headers REST would send
(`retry-after`, `x-ratelimit-*`) under `headers`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from graphql import GraphQLError

from citadel.gateway.errors import GatewayError, InternalError

log = logging.getLogger(__name__)


def extensions_of(error: GatewayError) -> dict[str, Any]:
    """The `extensions` of the GraphQL error for a gateway error."""
    out: dict[str, Any] = {
        "code": error.code or error.type,
        "type": error.type,
        "param": error.param,
        "status": error.status,
    }
    retry_after = error.headers.get("retry-after", "")
    if retry_after.isdecimal():  # whole seconds, the number its header holds
        out["retryAfter"] = int(retry_after)
    if error.headers:
        out["headers"] = dict(error.headers)
    return out


def graphql_error(error: GatewayError) -> GraphQLError:
    """The GraphQL error for a gateway error."""
    return GraphQLError(error.message, extensions=extensions_of(error))


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turns gateway errors (and unexpected ones) raised inside into GraphQL
    errors with the extensions above."""
    try:
        yield
    except GatewayError as err:
        raise graphql_error(err) from err
    except GraphQLError:
        raise
    except Exception as err:
        log.error("unexpected error", exc_info=err)
        raise graphql_error(InternalError("The gateway failed unexpectedly.")) from err
