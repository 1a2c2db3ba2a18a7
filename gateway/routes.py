"""The routing document: the contract between the operator and the gateway.

The operator writes it as JSON under the key `routes.json` of the ConfigMap
`citadel-routes` in the gateway's namespace, or gzipped under the binary key
`routes.json.gz` once it is too large to keep as text (`configmap_content`); the
gateway watches that ConfigMap (or reads the same document from a file outside
Kubernetes). The gateway owns the schema and both forms, so the operator imports
them from here.

Compatibility: `schemaVersion` is bumped only for changes an older reader cannot
ignore. Readers accept every version up to the one they know and ignore unknown
fields, so a newer operator can add fields while old gateways keep serving; a document
with a newer major version is refused with a clear error, and the gateway keeps the
last good document. Within a version, a route an older reader cannot use (a value
it does not know) costs that route only: a strategy it does not know reads as the
default, and any other route it cannot read is left out, each with a reason.
"""

from __future__ import annotations

import base64
import binascii
import enum
import gzip
import zlib
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import from_json

SCHEMA_VERSION = 1
CONFIGMAP_NAME = "citadel-routes"
CONFIGMAP_KEY = "routes.json"
CONFIGMAP_GZIP_KEY = "routes.json.gz"
"""The `binaryData` key of the document gzipped, written instead of
`CONFIGMAP_KEY` from `GZIP_FROM_BYTES` on."""
GZIP_FROM_BYTES = 512 * 1024
"""From this size of its JSON on, the document is stored gzipped. A ConfigMap
holds 1 MiB: as text, some 2,500-3,250 models (see `RoutingDocument.to_json`);
gzipped, some 29,000 to 41,000 (4,000 models with random names of 10 to 35
characters: 36 bytes a model, 10.6x, each in a namespace of its own; 26 bytes,
14.8x, in 10 namespaces; 2026-12-07); names that share most of their
characters compress 24-35x (2026-12-06). Below it the document stays readable with
`kubectl get` and readable by gateways older than the gzipped form."""
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
"""The most a gateway unpacks of a gzipped document (some 200,000 models): a
ConfigMap of 1 MiB of crafted gzip could otherwise unpack to gigabytes."""
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# What clients may send as "model": Hugging Face style names included.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
SPLIT_WEIGHT_TOTAL = 100
"""A split's weights are percents of the model's requests: together at most
this (all of them sent elsewhere)."""
ENDPOINT_PATTERN = r"^https?://[^/\s]+$"
FALLBACKS_FIELD = "fallbacks"
SPLIT_FIELD = "split"
UnknownNames = dict[tuple[str, str], tuple[str, ...]]
"""(`namespace/name` of a route, `FALLBACKS_FIELD` or `SPLIT_FIELD`) -> the
names that field lists that no route of the document has (`unknown_names`)."""


def _usable_endpoint(url: str) -> str:
    """`url`, once it splits into a host and a port as the upstream client
    splits it.

    Raises:
        ValueError: it does not (the message holds no value: see
            `invalid_fields`).
    """
    unreadable = "not a URL of a host and a port"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed bracket
        raise ValueError(unreadable) from None
    # The host and port, without a user part: `http://fd00::1:8000` matched
    # the pattern and failed every request sent to it ("bad port"), as
    # urlsplit reads a host before the first colon.
    host_port = parts.netloc.rpartition("@")[2]
    if host_port.count(":") > 1 and not host_port.startswith("["):
        raise ValueError(
            "an IPv6 address goes in brackets, as in http://[fd00::1]:8000"
        )
    try:
        _ = parts.port  # reading it checks it
    except ValueError:  # a port that is no number
        raise ValueError(unreadable) from None
    return url


Endpoint = Annotated[
    str, Field(pattern=ENDPOINT_PATTERN), AfterValidator(_usable_endpoint)
]
"""A replica's base URL, `http://host:port`."""


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


def _elsewhere(names: tuple[str, ...], info: ValidationInfo, what: str) -> None:
    """Refuses a name among `names` (a route's fallbacks or split targets,
    each a `what`) that is one of the route's own (`info.data`: its fields
    before, those that were valid), or that is listed twice."""
    own = {
        info.data.get("served_name"),
        *info.data.get("aliases", ()),
        *info.data.get("adapters", ()),
    }
    seen: set[str] = set()
    for name in names:
        if name in own:
            raise ValueError(f"{what} {name!r} is a name of the model itself")
        if name in seen:
            raise ValueError(f"{what} {name!r} is listed twice")
        seen.add(name)


class SplitTarget(_Model):
    """Another model that takes a share of a model's requests
    (`spec.routing.split`)."""

    model: Annotated[str, Field(pattern=SERVED_NAME_PATTERN)]
    """Its name as the split lists it: the servedName, an alias or an adapter
    of another model."""
    weight: Annotated[int, Field(ge=1, le=SPLIT_WEIGHT_TOTAL)]
    """The percent of the model's requests it takes."""


class ModelRoute(_Model):
    """One served model and where its replicas are."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    """The LLMModel's metadata.name."""
    namespace: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    served_name: Annotated[str, Field(pattern=SERVED_NAME_PATTERN, alias="servedName")]
    """What clients send as `model`."""
    aliases: tuple[Annotated[str, Field(pattern=SERVED_NAME_PATTERN)], ...] = ()
    adapters: tuple[Annotated[str, Field(pattern=SERVED_NAME_PATTERN)], ...] = ()
    """The names of the model's LoRA adapters: each routes to the model's
    replicas and is sent to them as it is (vLLM applies the adapter)."""
    service: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    """The Service whose EndpointSlices list the replicas."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    strategy: RoutingStrategy = RoutingStrategy.PREFIX_AWARE
    limits: RouteLimits = RouteLimits()
    pricing: RoutePricing = RoutePricing()
    ready: bool = False
    """True when at least one replica is Ready (the LLMModel's Ready condition)."""
    ready_replicas: int = Field(0, ge=0, alias="readyReplicas")
    scale_from_zero: bool = Field(False, alias="scaleFromZero")
    """True when the operator's autoscaler may scale the model to zero
    (`spec.autoscaling.minReplicas` 0): a request that finds no ready replica
    waits for one (the autoscaler starts one for it) instead of a 503."""
    fallbacks: tuple[Annotated[str, Field(pattern=SERVED_NAME_PATTERN)], ...] = ()
    """Other models' names, in order, that serve a request for this model
    when none of its replicas can (`spec.routing.fallbacks`): none ready, none
    reachable, or every one refusing it unworked."""
    split: tuple[SplitTarget, ...] = ()
    """Other models that take a share of the requests for this model's own
    names (`spec.routing.split`), in order: each its `weight` percent, the
    model the rest. The weights add up to at most 100."""
    max_requests_per_replica: int | None = Field(
        None, ge=1, alias="maxRequestsPerReplica"
    )
    """The most requests a gateway has at one replica at once
    (`spec.routing.maxRequestsPerReplica`); more wait at the gateway for a
    replica with room, standard priority before sheddable. None: no bound
    (the replicas queue what they cannot run)."""
    reserved_per_replica: int | None = Field(None, ge=1, alias="reservedPerReplica")
    """Of `max_requests_per_replica`, the places at each replica that only
    standard requests take (`spec.routing.reservedPerReplica`): a sheddable
    request takes a replica only while it has fewer than the bound less these
    in flight. Less than the bound, and only with one. None: none kept."""
    endpoints: tuple[Endpoint, ...] = ()
    """Replica base URLs (`http://host:port`, an IPv6 address in brackets:
    `http://[fd00::1]:8000`) for a gateway run from a file; in Kubernetes they
    come from the Service's EndpointSlices instead."""

    @field_validator("adapters")
    @classmethod
    def _adapters_named_apart(
        cls, adapters: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        # An adapter is another model on the same replicas: under the base's
        # own name it could not be told from the base, nor from its twin.
        # (`info.data` holds the fields before it that were valid.)
        seen = {info.data.get("served_name"), *info.data.get("aliases", ())}
        for adapter in adapters:
            if adapter in seen:
                raise ValueError(
                    f"{adapter!r} repeats the served name, an alias or another adapter"
                )
            seen.add(adapter)
        return adapters

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks_elsewhere(
        cls, fallbacks: tuple[str, ...], info: ValidationInfo
    ) -> tuple[str, ...]:
        # A fallback is another model: one of this model's own names would
        # send the request back to the replicas that just failed it.
        _elsewhere(fallbacks, info, "fallback")
        return fallbacks

    @field_validator("split")
    @classmethod
    def _split_elsewhere(
        cls, split: tuple[SplitTarget, ...], info: ValidationInfo
    ) -> tuple[SplitTarget, ...]:
        # A share sent to one of the model's own names would be no split.
        _elsewhere(tuple(target.model for target in split), info, "split target")
        total = sum(target.weight for target in split)
        if total > SPLIT_WEIGHT_TOTAL:
            raise ValueError(
                f"the split's weights add up to {total}, more than "
                f"{SPLIT_WEIGHT_TOTAL} percent"
            )
        return split

    @model_validator(mode="after")
    def _reserve_within_bound(self) -> Self:
        reserved, bound = self.reserved_per_replica, self.max_requests_per_replica
        if reserved is None:
            return self
        if bound is None:
            raise ValueError("reservedPerReplica needs maxRequestsPerReplica")
        if reserved >= bound:
            raise ValueError(
                f"reservedPerReplica ({reserved}) must be less than "
                f"maxRequestsPerReplica ({bound}): sheddable requests need a place"
            )
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """The base model's own names: the served name, then aliases (not its
        adapters', which name other models on the same replicas)."""
        return (self.served_name, *self.aliases)

    @property
    def all_names(self) -> tuple[str, ...]:
        """Every name that routes to this model's replicas: its own names,
        then its adapters'."""
        return (*self.names, *self.adapters)

    def parent_of(self, name: str) -> str | None:
        """The served name of the base model when `name` is one of its
        adapters (what vLLM lists as the adapter's `parent`), else None."""
        return self.served_name if name in self.adapters else None

    def upstream_name(self, requested: str) -> str:
        """The `model` sent to the replicas for a request naming `requested`
        (one of `all_names`): an adapter's name as it is, for vLLM to apply
        the adapter; any other name of the model as its served name (the
        aliases are the gateway's alone)."""
        return requested if requested in self.adapters else self.served_name


class RoutingDocument(_Model):
    """The whole document: every model the gateway serves."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1, alias="schemaVersion")
    models: tuple[ModelRoute, ...] = ()

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        seen: dict[str, str] = {}
        for route in self.models:
            for name in route.all_names:
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
        ConfigMap holds at most 1 MiB. A model without aliases, adapters,
        fallbacks or split takes 322 to 413 bytes (names of 10 to 35
        characters, namespaces of 3 to 19; its empty `adapters` 14 of them,
        `fallbacks` 15, `split` 11), some 2,500-3,250 models a MiB, more once
        gzipped (`configmap_content`); indented JSON took some 160 bytes more
        a model. Fields that are None are left out, which reads back the same
        (each defaults to None): 1,000 models of random names took 368 bytes
        each, 35.1 gzipped, against 418 and 36.1 with their nulls (`limits`'
        `rpm` and `tpm`, `maxRequestsPerReplica`; 2026-12-08); the empty
        `split` had left the gzipped size as it was (4,000 models with and
        without it, 33.8 bytes a model each, 2026-12-07)."""
        ordered = sorted(self.models, key=lambda r: (r.namespace, r.name))
        doc = self.model_copy(update={"models": tuple(ordered)})
        return doc.model_dump_json(by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class DocumentReading:
    """A routing document as a gateway can use it."""

    document: RoutingDocument
    problems: tuple[str, ...] = ()
    """One line per route left out or read differently; empty when used in full."""
    left_out: tuple[tuple[str, str], ...] = ()
    """(namespace, name) of each model whose route was left out."""

    def keeping(self, previous: RoutingDocument | None) -> DocumentReading:
        """This reading, where each model left out keeps the route `previous`
        had for it: a serving model goes on serving as before, rather than
        answering 404, until the gateway can read its new route."""
        wanted = set(self.left_out)
        owners = {
            n: (r.namespace, r.name) for r in self.document.models for n in r.all_names
        }
        kept: list[ModelRoute] = []
        notes = list(self.problems)
        for route in previous.models if previous else ():
            identity = (route.namespace, route.name)
            if identity not in wanted:
                continue
            where = f"model {route.namespace}/{route.name}"
            names = route.all_names
            if any(owners.get(name, identity) != identity for name in names):
                notes.append(f"{where}: left out, its names are taken")
                continue
            owners.update(dict.fromkeys(names, identity))
            kept.append(route)
            notes.append(f"{where}: its previous route stays in force")
        if not kept:
            return DocumentReading(self.document, tuple(notes), self.left_out)
        # One document at the end: each one built validates every name again.
        document = self.document.model_copy(
            update={"models": (*self.document.models, *kept)}
        )
        return DocumentReading(document, tuple(notes), self.left_out)


def read_document(raw: str | bytes) -> DocumentReading:
    """Parses a routing document, keeping every route this gateway can use.

    A route with a strategy this gateway does not know (a newer operator's) is
    routed with the default strategy; any other route it cannot read is left out.
    Each is named in `problems`: one model's new setting must not freeze the
    routes of every other model.

    Raises:
        RoutesError: the document as a whole is unusable: malformed JSON, no list
            of models, a newer schema version, or one name claimed by two models.
    """
    try:
        data = from_json(raw)
    except ValueError as err:
        raise RoutesError(f"invalid routing document: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise RoutesError("invalid routing document: not a JSON object")
    version = data.get("schemaVersion", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RoutesError(
            "invalid routing document: schemaVersion must be a positive integer, "
            f"not {version!r}"
        )
    if version > SCHEMA_VERSION:
        raise RoutesError(
            f"routing document has schemaVersion {version}; this gateway "
            f"understands up to {SCHEMA_VERSION}: upgrade the gateway first"
        )
    entries = data.get("models", [])
    if not isinstance(entries, list):
        raise RoutesError("invalid routing document: `models` must be a list")
    routes: list[ModelRoute] = []
    problems: list[str] = []
    left_out: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        where = _where(entry, i)
        strategy = entry.get("strategy") if isinstance(entry, dict) else None
        if isinstance(strategy, str) and strategy not in _STRATEGIES:
            entry = {**entry, "strategy": _DEFAULT_STRATEGY.value}
            problems.append(
                f"{where}: strategy {strategy!r} is unknown to this gateway; "
                f"routing with {_DEFAULT_STRATEGY.value}"
            )
        try:
            routes.append(ModelRoute.model_validate(entry))
        except ValidationError as err:
            problems.append(f"{where}: left out: {invalid_fields(err)}")
            if (identity := _identity(entry)) is not None:
                left_out.append(identity)
    try:
        document = RoutingDocument(schema_version=version, models=tuple(routes))
    except ValidationError as err:
        raise RoutesError(f"invalid routing document: {invalid_fields(err)}") from err
    return DocumentReading(document, tuple(problems), tuple(left_out))


def configmap_content(doc: RoutingDocument) -> dict[str, dict[str, str]]:
    """The routing ConfigMap's `data` or `binaryData` holding `doc`: its JSON
    as text, or from `GZIP_FROM_BYTES` on gzipped (base64, as the API takes
    binary data). The same document gives the same bytes every time (no time
    in the gzip header), so that an unchanged write changes nothing."""
    text = doc.to_json()
    raw = text.encode()
    if len(raw) < GZIP_FROM_BYTES:
        return {"data": {CONFIGMAP_KEY: text}}
    packed = gzip.compress(raw, mtime=0)
    return {"binaryData": {CONFIGMAP_GZIP_KEY: base64.b64encode(packed).decode()}}


def configmap_document(configmap: Mapping[str, Any]) -> str | bytes:
    """The routing document a ConfigMap holds (`configmap_content`'s either
    form), not yet parsed. The gzipped one wins when both are there: the
    operator writes it, then removes the text one.

    Raises:
        RoutesError: neither key, or what is there cannot be read.
    """
    binary = configmap.get("binaryData")
    packed = binary.get(CONFIGMAP_GZIP_KEY) if isinstance(binary, dict) else None
    if packed is not None:
        if not isinstance(packed, str):
            raise RoutesError(f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} is not base64")
        try:
            raw = base64.b64decode(packed, validate=True)
        except binascii.Error as err:
            raise RoutesError(
                f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} is not base64: {err}"
            ) from err
        return _gunzip(raw)
    data = configmap.get("data")
    text = data.get(CONFIGMAP_KEY) if isinstance(data, dict) else None
    if text is None:
        raise RoutesError(
            f"ConfigMap has neither key {CONFIGMAP_KEY!r} nor {CONFIGMAP_GZIP_KEY!r}"
        )
    if not isinstance(text, str):
        raise RoutesError(f"ConfigMap key {CONFIGMAP_KEY!r} is not text")
    return text


def _gunzip(packed: bytes) -> bytes:
    """`packed` unpacked, up to `MAX_DOCUMENT_BYTES`.

    Raises:
        RoutesError: not gzip, cut short, or larger than that once unpacked.
    """
    # wbits 16 + MAX_WBITS: the gzip header and trailer, checked.
    unpacker = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = unpacker.decompress(packed, MAX_DOCUMENT_BYTES)
    except zlib.error as err:
        raise RoutesError(
            f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} is not gzip: {err}"
        ) from err
    if unpacker.unconsumed_tail:
        raise RoutesError(
            f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} unpacks to more than "
            f"{MAX_DOCUMENT_BYTES} bytes"
        )
    if not unpacker.eof:
        raise RoutesError(f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} is cut short")
    if unpacker.unused_data:
        # More after the first gzip member (another member, or anything):
        # read, it would be a document cut at the first member's end.
        raise RoutesError(
            f"ConfigMap key {CONFIGMAP_GZIP_KEY!r} holds more than one gzip member"
        )
    return raw


def parse_document(raw: str | bytes) -> RoutingDocument:
    """Parses a routing document that must be usable in full (what an operator
    writes for a gateway of its own version).

    Raises:
        RoutesError: as `read_document`, and for any route it would leave out or
            read differently.
    """
    reading = read_document(raw)
    if reading.problems:
        raise RoutesError("invalid routing document: " + "; ".join(reading.problems))
    return reading.document


_STRATEGIES = frozenset(s.value for s in RoutingStrategy)
_DEFAULT_STRATEGY: RoutingStrategy = ModelRoute.model_fields["strategy"].default


def _identity(entry: Any) -> tuple[str, str] | None:
    """(namespace, name) of a route as written, when it has them."""
    if isinstance(entry, dict):
        namespace, name = entry.get("namespace"), entry.get("name")
        if isinstance(namespace, str) and isinstance(name, str):
            return namespace, name
    return None


def _where(entry: Any, index: int) -> str:
    """How a log line names one route of the document."""
    identity = _identity(entry)
    return f"model {identity[0]}/{identity[1]}" if identity else f"models[{index}]"


def invalid_fields(err: ValidationError, whole: str = "document") -> str:
    """A validation error on one line, field by field, without the values it
    held (a rejected key file may hold a key where its hash belongs, and the
    message goes to logs); `whole` names an error of the object itself."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or whole}: {e['msg']}"
        for e in err.errors(include_input=False, include_url=False)
    )


def unknown_names(
    document: RoutingDocument, named: Container[str] | None = None
) -> UnknownNames:
    """Each route's fallbacks and split targets that name no route of
    `document` (`named`: its routes' names, when the caller has them), as
    listed.

    Neither is a problem of the document: either may name a model made later,
    and the gateway skips it meanwhile. So both sides tell of them, that a typo
    shows: the gateway in its log, the operator in an Event on the model.
    """
    listing = [route for route in document.models if route.fallbacks or route.split]
    if not listing:
        return {}
    if named is None:
        named = {name for route in document.models for name in route.all_names}
    found: UnknownNames = {}
    for route in listing:
        key = f"{route.namespace}/{route.name}"
        for field, listed in (
            (FALLBACKS_FIELD, route.fallbacks),
            (SPLIT_FIELD, tuple(target.model for target in route.split)),
        ):
            unknown = tuple(name for name in listed if name not in named)
            if unknown:
                found[key, field] = unknown
    return found
