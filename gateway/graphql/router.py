"""`/graphql`: the strawberry router mounted in the gateway's FastAPI app.

POST (and GET for queries) over HTTP, and subscriptions over WebSocket
(`graphql-transport-ws`, and the older `graphql-ws`) on the same path. No
GraphiQL page: the gateway serves APIs only.
"""

from __future__ import annotations

from strawberry.fastapi import GraphQLRouter

from citadel.gateway.graphql.context import GraphQLContext, context_of
from citadel.gateway.graphql.schema import build_schema

PATH = "/graphql"


def graphql_router() -> GraphQLRouter[GraphQLContext, None]:
    """The router; `app.include_router(graphql_router())` mounts it."""
    return GraphQLRouter(
        build_schema(),
        path=PATH,
        graphql_ide=None,
        context_getter=context_of,
        include_in_schema=False,
    )
