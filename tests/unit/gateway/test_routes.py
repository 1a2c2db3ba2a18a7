"""The routing document: the operator -> gateway contract."""

from __future__ import annotations

import json

import pytest

from citadel.gateway.routes import (
    SCHEMA_VERSION,
    ModelRoute,
    RoutesError,
    RoutingDocument,
    RoutingStrategy,
    parse_document,
    read_document,
)

pytestmark = pytest.mark.unit


def _route(
    name: str = "smol", served: str = "smollm2", **extra: object
) -> dict[str, object]:
    return {
        "name": name,
        "namespace": "llm",
        "servedName": served,
        "service": name,
        **extra,
    }


def test_round_trip_keeps_every_field() -> None:
    doc = RoutingDocument.model_validate(
        {
            "schemaVersion": 1,
            "models": [
                _route(aliases=["chat"], strategy="least-load", limits={"rpm": 5})
            ],
        }
    )
    again = parse_document(doc.to_json())
    assert again == doc
    route = again.models[0]
    assert route.names == ("smollm2", "chat")
    assert route.strategy is RoutingStrategy.LEAST_LOAD
    assert route.limits.rpm == 5 and route.limits.tpm is None


def test_unknown_fields_from_a_newer_writer_are_ignored() -> None:
    raw = json.dumps(
        {"schemaVersion": 1, "futureField": 1, "models": [_route(extra=1)]}
    )
    assert parse_document(raw).models[0].name == "smol"


def test_newer_schema_version_is_refused_with_advice() -> None:
    with pytest.raises(RoutesError, match="upgrade the gateway"):
        parse_document(json.dumps({"schemaVersion": SCHEMA_VERSION + 1, "models": []}))


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        json.dumps({"models": [{"name": "x"}]}),
        json.dumps({"models": [_route(strategy="random")]}),
        json.dumps({"models": [_route(port=0)]}),
        json.dumps({"models": [_route(name="Bad_Name")]}),
    ],
)
def test_bad_documents_raise_routes_error(raw: str) -> None:
    with pytest.raises(RoutesError):
        parse_document(raw)


def test_a_route_a_gateway_cannot_use_costs_that_route_only() -> None:
    """A newer operator's value for one model leaves every other route in force."""
    raw = json.dumps(
        {
            "models": [
                _route("a", "aa", strategy="tree-of-experts", limits={"rpm": 5}),
                _route("b", "bb", port=0),
                _route("c", "cc"),
                "not a route",
            ]
        }
    )
    reading = read_document(raw)
    a, c = reading.document.models
    assert a.strategy is RoutingStrategy.PREFIX_AWARE and a.limits.rpm == 5
    assert c.name == "c"
    assert reading.problems == (
        "model llm/a: strategy 'tree-of-experts' is unknown to this gateway; "
        "routing with prefix-aware",
        "model llm/b: left out: port: Input should be greater than or equal to 1",
        "models[3]: left out: document: Input should be a valid dictionary or "
        "instance of ModelRoute",
    )
    with pytest.raises(RoutesError, match="llm/b: left out"):
        parse_document(raw)  # what an operator writes must be read in full


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        (json.dumps({"models": {"a": 1}}), "`models` must be a list"),
        (json.dumps({"schemaVersion": "1"}), "schemaVersion must be a positive"),
        (
            json.dumps({"schemaVersion": SCHEMA_VERSION + 1, "models": []}),
            "upgrade the gateway",
        ),
    ],
)
def test_a_document_unusable_as_a_whole_is_refused(raw: str, says: str) -> None:
    with pytest.raises(RoutesError, match=says):
        read_document(raw)


def test_one_name_cannot_route_to_two_models() -> None:
    raw = json.dumps(
        {"models": [_route("a", "same"), _route("b", "other", aliases=["same"])]}
    )
    with pytest.raises(RoutesError, match="claimed by both"):
        parse_document(raw)
    with pytest.raises(RoutesError, match="claimed by both"):
        read_document(raw)


def test_canonical_json_is_sorted_and_stable() -> None:
    doc = RoutingDocument(
        models=(
            ModelRoute.model_validate(_route("b", "bb")),
            ModelRoute.model_validate(_route("a", "aa")),
        )
    )
    assert [m["name"] for m in json.loads(doc.to_json())["models"]] == ["a", "b"]
    assert (
        doc.to_json() == RoutingDocument(models=tuple(reversed(doc.models))).to_json()
    )


def test_a_kept_route_whose_names_are_taken_now_is_left_out() -> None:
    previous = parse_document(
        json.dumps({"models": [_route("a", "aa", aliases=["x"]), _route("c", "cc")]})
    )
    raw = json.dumps(
        {
            "models": [
                _route("a", "aa", port=0),
                _route("b", "x"),
                _route("c", "cc", port=0),
            ]
        }
    )
    kept = read_document(raw).keeping(previous)
    assert sorted(r.name for r in kept.document.models) == ["b", "c"]
    assert "model llm/a: left out, its names are taken" in kept.problems
    assert "model llm/c: its previous route stays in force" in kept.problems
