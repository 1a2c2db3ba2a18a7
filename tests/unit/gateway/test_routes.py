"""The routing document: the operator -> gateway contract."""

from __future__ import annotations

import base64
import gzip
import json
import re
from typing import Any

import pytest

from citadel.gateway import routes
from citadel.gateway.routes import (
    CONFIGMAP_GZIP_KEY,
    CONFIGMAP_KEY,
    GZIP_FROM_BYTES,
    SCHEMA_VERSION,
    ModelRoute,
    RoutesError,
    RoutingDocument,
    RoutingStrategy,
    configmap_content,
    configmap_document,
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


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("http://fd00::1:8000", "an IPv6 address goes in brackets"),
        ("http://fd00::1", "an IPv6 address goes in brackets"),
        ("http://[fd00::1:8000", "not a URL of a host and a port"),
        ("http://10.0.0.7:http", "not a URL of a host and a port"),
    ],
)
def test_an_endpoint_the_gateway_cannot_split_is_refused(
    endpoint: str, says: str
) -> None:
    """An IPv6 address without brackets matched the pattern, and every request
    to it failed ("bad port": urlsplit reads the host up to the first colon)."""
    raw = json.dumps({"models": [_route(endpoints=["http://10.0.0.6:8000", endpoint])]})
    with pytest.raises(RoutesError, match=f"endpoints.1: Value error, {says}"):
        parse_document(raw)


def test_an_ipv6_endpoint_in_brackets_is_taken() -> None:
    urls = ["http://[fd00::1]:8000", "http://[::1]", "https://[fd00::1]:8443"]
    route = parse_document(json.dumps({"models": [_route(endpoints=urls)]})).models[0]
    assert route.endpoints == tuple(urls)


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


def _many(count: int) -> RoutingDocument:
    """A document of `count` models with names of 30-odd characters."""
    return RoutingDocument.model_validate(
        {
            "models": [
                _route(f"model-{i:05d}-instruct-v2", f"served-{i:05d}-instruct-v2")
                for i in range(count)
            ]
        }
    )


def test_a_small_document_is_stored_as_text() -> None:
    doc = _many(10)
    content = configmap_content(doc)
    assert content == {"data": {CONFIGMAP_KEY: doc.to_json()}}
    assert parse_document(configmap_document(content)) == doc


def test_a_large_document_is_stored_gzipped_and_reads_back() -> None:
    # 4,000 models: past the 1 MiB a ConfigMap holds as text.
    doc = _many(4000)
    assert len(doc.to_json()) > 1024 * 1024
    content = configmap_content(doc)
    assert set(content) == {"binaryData"}
    packed = content["binaryData"][CONFIGMAP_GZIP_KEY]
    assert len(base64.b64decode(packed)) < 100 * 1024
    assert parse_document(configmap_document(content)) == doc
    # The same bytes each time: an unchanged document is no change to apply.
    assert configmap_content(_many(4000)) == content


def test_the_text_form_ends_where_the_gzipped_one_starts() -> None:
    # Sizes either side of GZIP_FROM_BYTES decide the form, not the count.
    size = len(_many(1).to_json())
    per_model = len(_many(2).to_json()) - size
    below = 1 + (GZIP_FROM_BYTES - 1 - size) // per_model  # the most as text
    assert len(_many(below).to_json()) < GZIP_FROM_BYTES
    assert "data" in configmap_content(_many(below))
    assert len(_many(below + 1).to_json()) >= GZIP_FROM_BYTES
    assert "binaryData" in configmap_content(_many(below + 1))


def test_the_gzipped_form_wins_when_both_are_there() -> None:
    # Between the operator's write of one form and its removal of the other.
    new, old = _many(2), _many(1)
    packed = base64.b64encode(gzip.compress(new.to_json().encode())).decode()
    configmap = {
        "data": {CONFIGMAP_KEY: old.to_json()},
        "binaryData": {CONFIGMAP_GZIP_KEY: packed},
    }
    assert parse_document(configmap_document(configmap)) == new


def _gz(data: bytes) -> dict[str, Any]:
    return {"binaryData": {CONFIGMAP_GZIP_KEY: base64.b64encode(data).decode()}}


@pytest.mark.parametrize(
    ("configmap", "said"),
    [
        ({}, "neither key 'routes.json' nor 'routes.json.gz'"),
        ({"data": None}, "neither key"),
        ({"data": {"other": "{}"}}, "neither key"),
        ({"data": {CONFIGMAP_KEY: 5}}, "'routes.json' is not text"),
        ({"binaryData": {CONFIGMAP_GZIP_KEY: 5}}, "is not base64"),
        ({"binaryData": {CONFIGMAP_GZIP_KEY: "no base64!"}}, "is not base64"),
        (_gz(b'{"models": []}'), "is not gzip"),
        (_gz(gzip.compress(b'{"models": []}')[:-12]), "is cut short"),
    ],
)
def test_a_configmap_it_cannot_read_says_why(
    configmap: dict[str, Any], said: str
) -> None:
    with pytest.raises(RoutesError, match=re.escape(said)):
        configmap_document(configmap)


def test_a_gzipped_document_unpacks_to_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1 MiB of gzip can unpack to a GiB: no more than the bound is unpacked.
    monkeypatch.setattr(routes, "MAX_DOCUMENT_BYTES", 4096)
    text = b'{"models": []}' + b" " * 4096
    with pytest.raises(RoutesError, match="unpacks to more than 4096 bytes"):
        configmap_document(_gz(gzip.compress(text)))
    assert configmap_document(_gz(gzip.compress(text[:4096]))) == text[:4096]


def test_more_than_one_gzip_member_is_refused() -> None:
    # Read, it would be a document cut at the first member's end.
    text = _many(2).to_json().encode()
    half = len(text) // 2
    members = gzip.compress(text[:half]) + gzip.compress(text[half:])
    with pytest.raises(RoutesError, match="more than one gzip member"):
        configmap_document(_gz(members))
    with pytest.raises(RoutesError, match="more than one gzip member"):
        configmap_document(_gz(gzip.compress(text) + b"junk"))


@pytest.mark.parametrize(
    "endpoint", ["http://user:pw@vllm:8000", "http://vllm:8000?x=a:b", "http://u@[::1]"]
)
def test_a_user_part_or_a_query_is_no_part_of_the_host(endpoint: str) -> None:
    """Their colons were counted as an IPv6 address's, and the endpoint refused
    as one without brackets."""
    doc = {
        "models": [
            {
                "name": "m",
                "namespace": "ns",
                "servedName": "m",
                "service": "s",
                "endpoints": [endpoint],
            }
        ]
    }
    reading = read_document(json.dumps(doc))
    assert not reading.problems and reading.document.models[0].endpoints == (endpoint,)


def test_adapters_round_trip_and_route_to_their_model() -> None:
    raw = json.dumps({"models": [_route(aliases=["chat"], adapters=["sql", "org/x"])]})
    doc = parse_document(raw)
    route = doc.models[0]
    assert route.adapters == ("sql", "org/x")
    assert route.names == ("smollm2", "chat")  # the base's own names only
    assert route.all_names == ("smollm2", "chat", "sql", "org/x")
    assert parse_document(doc.to_json()) == doc
    assert json.loads(doc.to_json())["models"][0]["adapters"] == ["sql", "org/x"]


def test_an_adapter_is_sent_by_its_own_name_an_alias_by_the_served_one() -> None:
    route = ModelRoute.model_validate(_route(aliases=["chat"], adapters=["sql"]))
    assert route.upstream_name("sql") == "sql"
    assert route.upstream_name("chat") == "smollm2"
    assert route.upstream_name("smollm2") == "smollm2"


@pytest.mark.parametrize(
    "adapters", [["smollm2"], ["chat"], ["sql", "sql"], ["bad name"]]
)
def test_a_route_whose_adapter_names_clash_costs_that_route_only(
    adapters: list[str],
) -> None:
    raw = json.dumps(
        {
            "models": [
                _route("a", "smollm2", aliases=["chat"], adapters=adapters),
                _route("b", "bb"),
            ]
        }
    )
    reading = read_document(raw)
    assert [r.name for r in reading.document.models] == ["b"]
    assert reading.left_out == (("llm", "a"),)
    assert reading.problems[0].startswith("model llm/a: left out: adapters")
    with pytest.raises(RoutesError, match="llm/a: left out"):
        parse_document(raw)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"adapters": ["same"]}, {"adapters": ["same"]}),
        ({"adapters": ["same"]}, {"aliases": ["same"]}),
        ({"aliases": ["same"]}, {"adapters": ["same"]}),
        ({}, {"adapters": ["aa"]}),
    ],
)
def test_an_adapter_name_cannot_route_to_two_models(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    raw = json.dumps(
        {"models": [_route("a", "aa", **first), _route("b", "bb", **second)]}
    )
    with pytest.raises(RoutesError, match="claimed by both"):
        read_document(raw)


def test_a_kept_route_whose_adapter_name_is_taken_now_is_left_out() -> None:
    previous = parse_document(
        json.dumps({"models": [_route("a", "aa", adapters=["sql"])]})
    )
    raw = json.dumps({"models": [_route("a", "aa", port=0), _route("b", "sql")]})
    kept = read_document(raw).keeping(previous)
    assert [r.name for r in kept.document.models] == ["b"]
    assert "model llm/a: left out, its names are taken" in kept.problems


def test_fallbacks_round_trip_in_order() -> None:
    raw = json.dumps({"models": [_route(fallbacks=["small", "org/tiny"])]})
    doc = parse_document(raw)
    assert doc.models[0].fallbacks == ("small", "org/tiny")
    assert parse_document(doc.to_json()) == doc
    assert json.loads(doc.to_json())["models"][0]["fallbacks"] == ["small", "org/tiny"]
    # A writer before fallbacks: none.
    assert parse_document(json.dumps({"models": [_route()]})).models[0].fallbacks == ()


def test_a_split_round_trips_in_order() -> None:
    split = [{"model": "v2", "weight": 10}, {"model": "org/v3", "weight": 90}]
    doc = parse_document(json.dumps({"models": [_route(split=split)]}))
    assert [(t.model, t.weight) for t in doc.models[0].split] == [
        ("v2", 10),
        ("org/v3", 90),
    ]
    assert parse_document(doc.to_json()) == doc
    assert json.loads(doc.to_json())["models"][0]["split"] == split
    # A writer before splits: none.
    assert parse_document(json.dumps({"models": [_route()]})).models[0].split == ()


@pytest.mark.parametrize(
    ("split", "why"),
    [
        ([("smollm2", 10)], "name of the model itself"),
        ([("chat", 10)], "name of the model itself"),
        ([("sql", 10)], "name of the model itself"),
        ([("v2", 10), ("v2", 20)], "listed twice"),
        ([("v2", 60), ("v3", 41)], "add up to 101, more than 100 percent"),
        ([("v2", 0)], "split"),
        ([("v2", 101)], "split"),
        ([("bad name", 10)], "split"),
    ],
)
def test_a_route_with_a_split_it_cannot_take_costs_that_route_only(
    split: list[tuple[str, int]], why: str
) -> None:
    targets = [{"model": m, "weight": w} for m, w in split]
    raw = json.dumps(
        {
            "models": [
                _route(
                    "a", "smollm2", aliases=["chat"], adapters=["sql"], split=targets
                ),
                _route("b", "bb"),
            ]
        }
    )
    reading = read_document(raw)
    assert [r.name for r in reading.document.models] == ["b"]
    assert reading.left_out == (("llm", "a"),)
    assert why in reading.problems[0]


def test_a_split_may_send_every_request_elsewhere() -> None:
    split = [{"model": "v2", "weight": 40}, {"model": "v3", "weight": 60}]
    doc = parse_document(json.dumps({"models": [_route(split=split)]}))
    assert sum(t.weight for t in doc.models[0].split) == 100


@pytest.mark.parametrize(
    ("fallbacks", "why"),
    [
        (["smollm2"], "name of the model itself"),
        (["chat"], "name of the model itself"),
        (["sql"], "name of the model itself"),
        (["small", "small"], "listed twice"),
        (["bad name"], "fallbacks"),
    ],
)
def test_a_route_whose_fallbacks_name_itself_costs_that_route_only(
    fallbacks: list[str], why: str
) -> None:
    raw = json.dumps(
        {
            "models": [
                _route(
                    "a",
                    "smollm2",
                    aliases=["chat"],
                    adapters=["sql"],
                    fallbacks=fallbacks,
                ),
                _route("b", "bb"),
            ]
        }
    )
    reading = read_document(raw)
    assert [r.name for r in reading.document.models] == ["b"]
    assert reading.left_out == (("llm", "a"),)
    assert why in reading.problems[0]
