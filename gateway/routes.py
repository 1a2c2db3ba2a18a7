"""The routing document: the contract between the operator and the gateway.

The operator writes it as JSON under the key `routes.json` of the ConfigMap
`citadel-routes` in the gateway's namespace; the gateway watches that ConfigMap (or
reads the same document from a file outside Kubernetes). The gateway owns the
schema, so the operator imports it from here.

Compatibility: `schemaVersion` is bumped only for changes an older reader cannot
ignore. Readers accept every version up to the one they know and ignore unknown
fields, so a newer operator can add fields while old gateways keep serving; a document
with a newer major version is refused with a clear error, and the gateway keeps the
last good document.
"""

from __future__ import annotations

import enum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
CONFIGMAP_NAME = "citadel-routes"
CONFIGMAP_KEY = "routes.json"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# What clients may send as "model": Hugging Face style names included.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
ENDPOINT_PATTERN = r"^https?://[^/\s]+$"


class RoutesError(ValueError):
    """A routing document that cannot be used; the message says why."""


class RoutingStrategy(enum.StrEnum):
    """How the gateway picks a replica for a request."""

    ROUND_ROBIN = "round-robin"
    LEAST_LOAD = "least-load"
    PREFIX_AWARE = "prefix-aware"
    KV_AWARE = "kv-aware"
    SESSION_AFFINITY = "session-affinity"


class _Model(BaseModel):
    # Unknown fields from a newer writer are ignored, never an error.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class RouteLimits(_Model):
    """Per-key defaults for one model; None means unlimited."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None


class RoutePricing(_Model):
    """Price per million tokens, for the cost metric; zero when not configured."""

    prompt_per_million: float = Field(0.0, ge=0, alias="promptPerMillion")
    completion_per_million: float = Field(0.0, ge=0, alias="completionPerMillion")


class ModelRoute(_Model):
    """One served model and where its replicas are."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    """The LLMModel's metadata.name."""
    namespace: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    served_name: Annotated[str, Field(pattern=SERVED_NAME_PATTERN, alias="servedName")]
    """What clients send as `model`."""
    aliases: tuple[Annotated[str, Field(pattern=SERVED_NAME_PATTERN)], ...] = ()
    service: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    """The Service whose EndpointSlices list the replicas."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    strategy: RoutingStrategy = RoutingStrategy.PREFIX_AWARE
    limits: RouteLimits = RouteLimits()
    pricing: RoutePricing = RoutePricing()
    ready: bool = False
    """True when at least one replica is Ready (the LLMModel's Ready condition)."""
    ready_replicas: int = Field(0, ge=0, alias="readyReplicas")
    endpoints: tuple[Annotated[str, Field(pattern=ENDPOINT_PATTERN)], ...] = ()
    """Replica base URLs (`http://host:port`) for a gateway run from a file;
    in Kubernetes they come from the Service's EndpointSlices instead."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that routes to this model: the served name, then aliases."""
        return (self.served_name, *self.aliases)


class RoutingDocument(_Model):
    """The whole document: every model the gateway serves."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1, alias="schemaVersion")
    models: tuple[ModelRoute, ...] = ()

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        seen: dict[str, str] = {}
        for route in self.models:
            for name in route.names:
                owner = f"{route.namespace}/{route.name}"
                if name in seen and seen[name] != owner:
                    raise ValueError(
                        f"model name {name!r} is claimed by both {seen[name]} "
                        f"and {owner}"
                    )
                seen[name] = owner
        return self

    def to_json(self) -> str:
        """The canonical JSON form (sorted models, stable key order), compact: a
        ConfigMap holds at most 1 MiB. A model without aliases takes 285 bytes
        with names of 10 characters and 387 with names of 35, where indented
        JSON took 445 and 547: some 2,700-3,700 models fit, not 1,900-2,400."""
        ordered = sorted(self.models, key=lambda r: (r.namespace, r.name))
        doc = self.model_copy(update={"models": tuple(ordered)})
        return doc.model_dump_json(by_alias=True)


def parse_document(raw: str | bytes) -> RoutingDocument:
    """Parses and validates a routing document.

    Raises:
        RoutesError: the JSON is malformed, does not match the schema, or comes
            from a newer, incompatible schema version.
    """
    try:
        doc = RoutingDocument.model_validate_json(raw)
    except ValidationError as err:
        raise RoutesError(f"invalid routing document: {err}") from err
    if doc.schema_version > SCHEMA_VERSION:
        raise RoutesError(
            f"routing document has schemaVersion {doc.schema_version}; this gateway "
            f"understands up to {SCHEMA_VERSION}: upgrade the gateway first"
        )
    return doc
