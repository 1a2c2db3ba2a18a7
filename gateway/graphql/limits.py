"""How long the lists in a GraphQL operation's variables may be.

graphql-core coerces every variable into its input type before any resolver
runs: about 27 us for each message of a chat, so the 300,000 messages that fit
in 8 MiB of variables held the event loop for 8 s before `parse_body` could
refuse them. The lists written in the document itself are bounded by its token
limit; those in the variables are checked here, before the coercion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from graphql import (
    DocumentNode,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLSchema,
    get_nullable_type,
    get_operation_ast,
    type_from_ast,
)
from strawberry.extensions import SchemaExtension

from citadel.gateway.errors import GatewayError, InvalidRequest
from citadel.gateway.graphql.context import GraphQLContext
from citadel.gateway.graphql.errors import graphql_error
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.requests import CHAT, MAX_MESSAGES, Door

MAX_LIST_ITEMS = MAX_MESSAGES
"""The most items of any list in the variables: the longest array a request
may hold (`parse_body` then applies each field's own limit)."""


class VariableListLimiter(SchemaExtension):
    """Refuses an operation whose variables hold a list longer than
    `MAX_LIST_ITEMS`, before graphql-core coerces them; counted as REST counts
    the 400 it answers such a body with."""

    def on_execute(self) -> Iterator[None]:
        run = self.execution_context
        document = run.graphql_document
        if document is not None:
            found = overlong_list(
                run.schema._schema, document, run.operation_name, run.variables
            )
            if found is not None:
                path, length = found
                error = InvalidRequest(
                    f"`{path}` has {length:,} items; at most {MAX_LIST_ITEMS:,} "
                    "are allowed."
                )
                _count(run.context, error)
                raise graphql_error(error)
        yield


def _count(context: Any, error: GatewayError) -> None:
    if not isinstance(context, GraphQLContext):
        return
    principal: Principal | None = None
    with contextlib.suppress(GatewayError):  # a revoked key is refused later
        principal = context.principal()
    context.deps.proxy.refused(CHAT, context.request_id, error, Door.GRAPHQL, principal)


def overlong_list(
    schema: GraphQLSchema,
    document: DocumentNode,
    operation_name: str | None,
    variables: Any,
) -> tuple[str, int] | None:
    """The path (`$input.messages`) and length of a list in `variables`
    longer than `MAX_LIST_ITEMS`, if there is one.

    The walk follows the variables' types, and goes into a list's items only
    when their type can hold a list itself: at most one step for each field
    of the types, and none for each of 10,000 messages.
    """
    operation = get_operation_ast(document, operation_name)
    if operation is None or not isinstance(variables, dict):
        return None
    stack: list[tuple[str, Any, GraphQLInputType]] = []
    for definition in operation.variable_definitions or ():
        name = definition.variable.name.value
        declared = type_from_ast(schema, definition.type)
        if name in variables and declared is not None:
            stack.append((f"${name}", variables[name], declared))  # type: ignore[arg-type]
    while stack:
        path, value, of_type = stack.pop()
        nullable = get_nullable_type(of_type)
        if isinstance(nullable, GraphQLList) and isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                return path, len(value)
            if _holds_lists(nullable.of_type):
                stack.extend(
                    (f"{path}[{i}]", item, nullable.of_type)
                    for i, item in enumerate(value)
                )
        elif isinstance(nullable, GraphQLInputObjectType) and isinstance(value, dict):
            stack.extend(
                (f"{path}.{name}", value[name], field.type)
                for name, field in nullable.fields.items()
                if name in value
            )
    return None


def _holds_lists(of_type: GraphQLInputType, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a value of `of_type` can hold a list."""
    nullable = get_nullable_type(of_type)
    if isinstance(nullable, GraphQLList):
        return True
    if isinstance(nullable, GraphQLInputObjectType) and nullable.name not in seen:
        inner = seen | {nullable.name}
        return any(_holds_lists(f.type, inner) for f in nullable.fields.values())
    return False
