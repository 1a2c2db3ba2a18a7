"""An LLMModel as the operator sees it: identity, parsed spec, last status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from citadel.operator import names
from citadel.operator.spec import LLMModelSpec, parse_spec
from citadel.operator.status import LLMModelStatus


@dataclass(frozen=True)
class LLMModel:
    """One LLMModel object.

    Attributes:
        name: metadata.name.
        namespace: metadata.namespace.
        uid: metadata.uid (for owner references).
        generation: metadata.generation.
        created: metadata.creationTimestamp (RFC 3339), which orders name claims.
        spec: the parsed spec, with servedName resolved.
        status: the status as last written.
    """

    name: str
    namespace: str
    uid: str
    generation: int
    created: str
    spec: LLMModelSpec
    status: LLMModelStatus

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LLMModel:
        """Parses an object as the API returns it.

        Raises:
            pydantic.ValidationError: the spec or status does not parse.
        """
        meta = body.get("metadata", {})
        name = str(meta["name"])
        return cls(
            name=name,
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation", 0)),
            created=str(meta.get("creationTimestamp", "")),
            spec=parse_spec(name, body.get("spec", {})),
            status=LLMModelStatus.model_validate(body.get("status") or {}),
        )

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"

    @property
    def served_name(self) -> str:
        """What clients send as `model`."""
        return self.spec.served_name or self.name

    @property
    def endpoint(self) -> str:
        """The Service URL of the model's server."""
        return names.endpoint(self.name, self.namespace)
