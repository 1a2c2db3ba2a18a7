"""Config reload from files and from Kubernetes objects (no API server)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.gateway.errors import ModelNotFound
from citadel.gateway.kube.client import KubeApiError
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.routes import (
    CONFIGMAP_GZIP_KEY,
    CONFIGMAP_KEY,
    DocumentReading,
    RoutingDocument,
    read_document,
)
from citadel.gateway.services.auth import InMemoryKeyStore, KeyRecord, hash_key
from citadel.gateway.services.catalog import Catalog, routing_table
from citadel.gateway.services.replicas import Endpoint, LoadReport
from citadel.gateway.services.scraper import (
    MAX_CONCURRENT_SCRAPES,
    MetricsScraper,
    parse_vllm_metrics,
    report_max_age_s,
)
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.sources import base as sources_base
from citadel.gateway.sources import files as files_source
from citadel.gateway.sources import kubernetes as kube_source
from citadel.gateway.sources.files import (
    FileWatcher,
    keys_file_source,
    routes_file_source,
)
from citadel.gateway.sources.kubernetes import (
    KeySecretsSource,
    RoutesWatchSource,
    key_from_secret,
    key_secret,
    slice_endpoints,
)
from citadel.gateway.upstream import UpstreamTimeout
from citadel.gateway.wiring import build_deps

pytestmark = pytest.mark.unit


def doc(served: str = "m", endpoints: tuple[str, ...] = ("http://127.0.0.1:9",)) -> str:
    route = {
        "name": "m",
        "namespace": "llm",
        "servedName": served,
        "service": "m",
        "endpoints": list(endpoints),
    }
    return json.dumps({"schemaVersion": 1, "models": [route]})


class RoutesFile:
    """A catalog fed from a routes file, and what each of its reloads gave."""

    def __init__(self, tmp_path: Path) -> None:
        self.results: list[str] = []
        self.catalog = Catalog(self.results.append)
        self.path = tmp_path / "routes.json"
        self.watcher = routes_file_source(self.path, self.catalog, 1.0)

    async def load(self, *models: dict[str, Any]) -> None:
        """Writes a document of `models` and reloads it."""
        self.path.write_text(json.dumps({"models": list(models)}))
        await self.watcher.check()


# The one route of `doc("first")`, and another model's beside it.
FIRST = json.loads(doc("first"))["models"][0]
OTHER = {**FIRST, "name": "o", "servedName": "other", "service": "o"}


async def test_routes_file_reloads_and_keeps_last_good(tmp_path: Path) -> None:
    results: list[str] = []
    catalog = Catalog(results.append)
    path = tmp_path / "routes.json"
    path.write_text(doc("first"))
    watcher = routes_file_source(path, catalog, 1.0)
    await watcher.check()
    route = catalog.resolve("first")
    assert [r.url for r in catalog.replicas(route)] == ["http://127.0.0.1:9"]
    path.write_text("{broken")
    await watcher.check()
    assert catalog.resolve("first") is route  # the last good document stays
    path.write_text(doc("second", ("http://127.0.0.1:7", "http://127.0.0.1:8")))
    await watcher.check()
    assert len(catalog.replicas(catalog.resolve("second"))) == 2
    await watcher.check()  # unchanged: not loaded again
    assert results == ["ok", "invalid", "ok"]


async def test_a_routes_file_routes_adapters_to_their_model(tmp_path: Path) -> None:
    catalog = Catalog()
    path = tmp_path / "routes.json"
    route = {**json.loads(doc("base"))["models"][0], "adapters": ["sql-expert"]}
    path.write_text(json.dumps({"models": [route]}))
    await routes_file_source(path, catalog, 1.0).check()
    adapter = catalog.resolve("sql-expert")
    assert adapter is catalog.resolve("base")
    assert [r.url for r in catalog.replicas(adapter)] == ["http://127.0.0.1:9"]


async def test_a_route_left_out_of_a_document_keeps_the_others_current(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = RoutesFile(tmp_path)
    newer = {**FIRST, "name": "n", "servedName": "newer", "port": "any"}
    await routes.load(FIRST, newer)
    assert routes.catalog.resolve("first").name == "m"
    assert routes.results == ["partial"]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "model llm/n: left out: port" in warning.getMessage()


async def test_a_serving_model_whose_route_turns_unreadable_keeps_its_route(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer operator's value for one model (read by an older gateway) must not
    turn that serving model into a 404."""
    routes = RoutesFile(tmp_path)
    catalog = routes.catalog
    await routes.load({**FIRST, "limits": {"rpm": 5}}, OTHER)
    newer = {**FIRST, "limits": {"rpm": 0}}  # refused by this gateway's schema
    await routes.load(newer, {**OTHER, "aliases": ["o2"]})
    assert routes.results == ["ok", "partial"]
    assert catalog.resolve("first").limits.rpm == 5  # as before
    assert catalog.resolve("o2").name == "o"  # the other model's change is in
    assert [r.url for r in catalog.replicas(catalog.resolve("first"))] == [
        "http://127.0.0.1:9"
    ]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("llm/m: its previous route stays in force" in m for m in said)


async def test_a_fallback_that_names_no_model_is_told_once_and_not_a_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = RoutesFile(tmp_path)
    falling = {**FIRST, "fallbacks": ["later"]}

    def told() -> list[str]:
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        caplog.clear()
        return said

    await routes.load(falling)
    assert told() == [
        "routing document: model llm/m: its fallback 'later' names no model; "
        "skipped until one does"
    ]
    # Another change: the same fallback, not told again.
    await routes.load({**falling, "aliases": ["f"]})
    assert told() == []
    # The model comes: nothing to tell; it goes again: told again.
    await routes.load(falling, {**OTHER, "aliases": ["later"]})
    assert told() == []
    await routes.load(falling)
    assert len(told()) == 1
    # None of it made a reload partial (no alert for a model made later).
    assert routes.results == ["ok", "ok", "ok", "ok"]


async def test_a_split_target_that_names_no_model_is_told_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = RoutesFile(tmp_path)
    await routes.load({**FIRST, "split": [{"model": "later", "weight": 10}]})
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "routing document: model llm/m: its split target 'later' names no model; "
        "its share stays with the model until one does"
    ]
    assert routes.results == ["ok"]


def test_the_last_reload_gauge_holds_until_a_document_is_used_in_full() -> None:
    metrics = GatewayMetrics()
    sample = metrics.registry.get_sample_value
    last = "citadel_gateway_config_last_reload_successful"
    seen = [sample(last)]
    for result in ("partial", "ok", "invalid", "ok"):
        metrics.reloaded(result)
        seen.append(sample(last))
    assert seen == [1, 0, 1, 0, 1]
    labels = {"status": "ok"}
    assert sample("citadel_gateway_config_reloads_total", labels) == 2


async def test_a_route_the_file_drops_takes_its_replicas_with_it(
    tmp_path: Path,
) -> None:
    def routes(*services: str) -> str:
        models = [
            {
                "name": service,
                "namespace": "llm",
                "servedName": service,
                "service": service,
                "endpoints": [f"http://10.0.0.{i}:8000"],
            }
            for i, service in enumerate(services, start=1)
        ]
        return json.dumps({"schemaVersion": 1, "models": models})

    catalog = Catalog()
    path = tmp_path / "routes.json"
    path.write_text(routes("a", "b"))
    watcher = routes_file_source(path, catalog, 1.0)
    await watcher.check()
    assert len(catalog.all_replicas()) == 2
    path.write_text(routes("b"))
    await watcher.check()
    assert list(catalog.all_replicas()) == ["http://10.0.0.1:8000"]
    assert catalog.services() == [("llm", "b")]


async def test_keys_file_reloads(tmp_path: Path) -> None:
    store = InMemoryKeyStore()
    path = tmp_path / "keys.json"
    record = KeyRecord(name="a", hash=hash_key("k"))
    path.write_bytes(orjson.dumps({"keys": [record.model_dump(mode="json")]}))
    watcher = keys_file_source(path, store, 1.0)
    await watcher.check()
    assert store.lookup(hash_key("k")) == record
    path.write_text('{"keys": [{"name": "BAD"}]}')
    await watcher.check()
    assert len(store) == 1  # a bad file keeps the keys in force
    path.write_text('{"keys": []}')
    await watcher.check()
    assert len(store) == 0


async def test_a_rejected_key_file_logs_fields_not_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw key put where its hash belongs must not reach the logs."""
    path = tmp_path / "keys.json"
    secret = "ctd-" + "s" * 40
    path.write_text(orjson.dumps({"keys": [{"name": "a", "hash": secret}]}).decode())
    await keys_file_source(path, InMemoryKeyStore(), 1.0).check()
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "keys.0.hash" in record.error  # type: ignore[attr-defined]
    assert secret not in record.error  # type: ignore[attr-defined]


async def test_deleting_the_key_file_revokes_every_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No file is no keys, as for a gateway started now and for `citadel keys`;
    a file there but unreadable keeps the keys in force."""
    store = InMemoryKeyStore()
    path = tmp_path / "keys.json"
    record = KeyRecord(name="a", hash=hash_key("k"))
    content = orjson.dumps({"keys": [record.model_dump(mode="json")]})
    path.write_bytes(content)
    watcher = keys_file_source(path, store, 1.0)
    await watcher.check()
    assert store.lookup(record.hash) == record
    path.unlink()
    path.mkdir()  # there, but no file to read: kept
    await watcher.check()
    assert store.lookup(record.hash) == record
    path.rmdir()
    await watcher.check()
    await watcher.check()
    assert len(store) == 0
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == "key file missing; no keys in force"
    path.write_bytes(content)  # back: loaded again
    await watcher.check()
    assert store.lookup(record.hash) == record


async def test_a_deleted_routes_file_keeps_the_routes(tmp_path: Path) -> None:
    """Unlike keys: losing the routes file must not take every model away."""
    catalog = Catalog()
    path = tmp_path / "routes.json"
    path.write_text(doc("first"))
    watcher = routes_file_source(path, catalog, 1.0)
    await watcher.check()
    path.unlink()
    await watcher.check()
    assert catalog.resolve("first").name == "m"


async def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_loaded(
    tmp_path: Path,
) -> None:
    """An atomic replace within one tick of the file system's clock, with as
    many bytes: only the inode tells the new file from the old."""
    loaded: list[bytes] = []

    async def load(data: bytes) -> None:
        loaded.append(data)

    path, new = tmp_path / "keys.json", tmp_path / "keys.json.new"
    path.write_bytes(b"old")
    watcher = FileWatcher(path, load, 1.0)
    await watcher.check()
    new.write_bytes(b"new")
    before = path.stat()
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(new, path)
    await watcher.check()
    await watcher.check()
    assert loaded == [b"old", b"new"]


def test_copies_of_the_chart_s_admin_key_record_keep_it_working() -> None:
    """Two releases sharing a keys namespace with one admin key render
    byte-identical records without `created`: the key works while either is
    there, whatever way the gateway saw them come."""
    raw = orjson.dumps(
        {"hash": hash_key("k"), "models": ["*"], "name": "admin", "role": "admin"}
    )

    def secret(name: str) -> dict[str, Any]:
        labels = {"citadel.ai/api-key": "true"}
        data = {"key.json": base64.b64encode(raw).decode()}
        return {"metadata": {"name": name, "labels": labels}, "data": data}

    staging = secret("citadel-key-admin.staging")
    prod = secret("citadel-key-admin.prod")
    watched, listed = InMemoryKeyStore(), InMemoryKeyStore()
    source = KeySecretsSource(None, "ns", watched)  # type: ignore[arg-type]
    source._sync([staging])
    source._event("ADDED", prod)
    KeySecretsSource(None, "ns", listed)._sync([staging, prod])  # type: ignore[arg-type]
    for store in (watched, listed):
        assert _accepted(store, ["k"]) == {"k"}
    source._event("DELETED", staging)
    assert _accepted(watched, ["k"]) == {"k"}


def test_endpoint_slice_conditions() -> None:
    slice_ = {
        "ports": [{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"]},
            {
                "addresses": ["10.0.0.3"],
                "conditions": {"ready": False, "serving": True, "terminating": True},
            },
            {"addresses": ["fd00::4"], "conditions": {"ready": False}},
            {"addresses": []},
        ],
    }
    assert slice_endpoints(slice_) == [
        Endpoint("http://10.0.0.1:8000"),
        Endpoint("http://10.0.0.2:8000"),
        Endpoint("http://10.0.0.3:8000", ready=False, serving=True, terminating=True),
        Endpoint("http://[fd00::4]:8000", ready=False, serving=False),
    ]
    assert slice_endpoints({"endpoints": [{"addresses": ["10.0.0.1"]}]}) == []


def _slice(name: str, service: str, *ips: str) -> dict[str, object]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"port": 8000}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


async def test_configmap_and_slices_feed_the_catalog() -> None:
    catalog = Catalog()
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    await source._load({"data": {CONFIGMAP_KEY: doc("m", ())}})
    route = catalog.resolve("m")
    assert "llm" in source._slice_watches
    for task in source._slice_watches.values():
        task.cancel()
    from citadel.gateway.sources.kubernetes import _SliceView

    view = _SliceView("llm", catalog, {"m"})
    view.sync([_slice("m-1", "m", "10.0.0.1"), _slice("x-1", "other", "10.0.0.9")])
    assert [r.url for r in catalog.replicas(route)] == ["http://10.0.0.1:8000"]
    # A Service no model names (every Service has slices) is no replica.
    assert set(catalog.all_replicas()) == {"http://10.0.0.1:8000"}
    view.event("ADDED", _slice("m-2", "m", "10.0.0.2"))
    assert len(catalog.replicas(route)) == 2
    view.event("DELETED", _slice("m-1", "m"))
    view.event("DELETED", _slice("m-2", "m"))
    assert catalog.replicas(route) == []
    assert catalog.all_replicas() == {}
    await source._load({"data": {CONFIGMAP_KEY: "{bad"}})
    await source._event("DELETED", {})
    assert catalog.resolve("m") is route


async def test_a_pod_moved_to_another_slice_keeps_its_replica_state() -> None:
    from citadel.gateway.sources.kubernetes import _SliceView

    now = [0.0]
    catalog = Catalog(clock=lambda: now[0])
    view = _SliceView("llm", catalog, {"m"})
    view.sync([_slice("m-1", "m", "10.0.0.1")])
    [replica] = catalog.all_replicas().values()
    replica.in_flight, replica.ejected_until = 2, 30.0
    # The controller moves the pod: the old slice's event comes first.
    view.event("DELETED", _slice("m-1", "m"))
    now[0] = 5.0
    view.event("ADDED", _slice("m-2", "m", "10.0.0.1"))
    assert catalog.all_replicas() == {"http://10.0.0.1:8000": replica}
    # An address gone for longer starts afresh.
    view.event("DELETED", _slice("m-2", "m"))
    now[0] += Catalog.DEPARTED_KEEP_S
    view.event("ADDED", _slice("m-3", "m", "10.0.0.1"))
    [again] = catalog.all_replicas().values()
    assert again is not replica and again.in_flight == 0


async def test_slices_push_only_their_service_and_leave_nothing_behind() -> None:
    from citadel.gateway.sources.kubernetes import _SliceView

    catalog = Catalog()
    view = _SliceView("llm", catalog, {"a", "b"})
    view.sync([_slice("a-1", "a", "10.0.0.1"), _slice("b-1", "b", "10.0.0.2")])
    pushed: list[str] = []
    original = catalog.set_endpoints

    def spy(namespace: str, service: str, endpoints: Any) -> None:
        pushed.append(service)
        original(namespace, service, endpoints)

    catalog.set_endpoints = spy  # type: ignore[method-assign]
    # A pod in two slices while they are reshuffled counts once.
    view.event("ADDED", _slice("a-2", "a", "10.0.0.1", "10.0.0.3"))
    assert pushed == ["a"]
    urls = sorted(catalog.all_replicas())
    assert urls == [f"http://10.0.0.{i}:8000" for i in (1, 2, 3)]
    # A model left out of the document takes its replicas with it.
    view.route({"b"})
    assert sorted(catalog.all_replicas()) == ["http://10.0.0.2:8000"]
    assert catalog.services() == [("llm", "b")]
    # A namespace no longer watched is forgotten: its addresses could be stale
    # by the time it is watched again.
    catalog.forget_namespace("llm")
    assert catalog.all_replicas() == {} and catalog.services() == []


def test_key_secret_round_trip_and_watch_events() -> None:
    record = KeyRecord(name="alice", hash=hash_key("k"), rpm=5, daily_tokens=10)
    secret = key_secret(record, "citadel-system")
    assert secret["metadata"]["labels"]["citadel.ai/api-key"] == "true"
    assert "k" not in base64.b64decode(secret["data"]["key.json"]).decode().split('"')
    assert key_from_secret(secret) == record
    assert key_from_secret({"data": {"key.json": "bm9wZQ=="}}) is None
    store = InMemoryKeyStore()
    source = KeySecretsSource(None, "citadel-system", store)  # type: ignore[arg-type]
    source._sync([secret])
    assert store.lookup(record.hash) == record
    source._event("DELETED", secret)
    assert store.lookup(record.hash) is None


def test_a_key_secret_edited_into_a_bad_record_disables_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a gateway started after the edit would (it skips the Secret), and not
    the record the edit meant to change."""
    record = KeyRecord(name="alice", hash=hash_key("k"), models=["*"])
    secret = key_secret(record, "citadel-system")
    store = InMemoryKeyStore()
    source = KeySecretsSource(None, "citadel-system", store)  # type: ignore[arg-type]
    source._event("ADDED", secret)
    assert store.lookup(record.hash) == record
    broken = {
        **secret,
        "data": {"key.json": base64.b64encode(b'{"name": "alice"').decode()},
    }
    source._event("MODIFIED", broken)
    assert store.lookup(record.hash) is None
    assert "key disabled until its Secret is mended" in caplog.text
    restarted = InMemoryKeyStore()
    KeySecretsSource(None, "citadel-system", restarted)._sync([broken])  # type: ignore[arg-type]
    assert len(restarted) == 0
    source._event("MODIFIED", secret)  # mended
    assert store.lookup(record.hash) == record


def test_a_broken_key_secret_takes_away_only_the_key_it_held() -> None:
    """Not the key its labels name: a copy of alice's Secret, renamed and broken,
    leaves alice's key working (as a gateway started now would)."""
    alice = KeyRecord(name="alice", hash=hash_key("a"), models=["*"])
    secret = key_secret(alice, "citadel-system")
    store = InMemoryKeyStore()
    source = KeySecretsSource(None, "citadel-system", store)  # type: ignore[arg-type]
    source._sync([secret])
    copy = {
        **secret,
        "metadata": {**secret["metadata"], "name": "citadel-key-bob"},
        "data": {"key.json": base64.b64encode(b"{").decode()},
    }
    source._event("ADDED", copy)
    source._event("MODIFIED", copy)
    source._event("DELETED", copy)
    assert store.lookup(alice.hash) == alice
    # A record edited to name another key: the key it named before goes.
    carol = KeyRecord(name="carol", hash=hash_key("c"), models=["*"])
    source._event("MODIFIED", {**secret, "data": key_secret(carol, "x")["data"]})
    assert store.lookup(alice.hash) is None
    assert store.lookup(carol.hash) == carol


def _accepted(store: InMemoryKeyStore, keys: list[str]) -> set[str]:
    return {key for key in keys if store.lookup(hash_key(key)) is not None}


def test_each_key_secret_is_a_key_of_its_own() -> None:
    """Secret B holds alice's name with a new key (a rotation made by hand):
    each key works exactly while its own Secret exists, in a gateway that saw
    every event and in one started (`_sync`) at any step and then fed the
    events after it, so replicas agree."""
    keys = ["ctd-old", "ctd-new"]
    a = key_secret(KeyRecord(name="alice", hash=hash_key("ctd-old")), "ns")
    b = key_secret(KeyRecord(name="alice", hash=hash_key("ctd-new")), "ns")
    b["metadata"]["name"] = "citadel-key-alice-rotated"
    copy = {**a, "metadata": {**a["metadata"], "name": "citadel-key-alice-copy"}}
    steps: list[tuple[str, dict[str, Any], set[str]]] = [
        ("ADDED", a, {"ctd-old"}),
        ("ADDED", b, {"ctd-old", "ctd-new"}),
        ("ADDED", copy, {"ctd-old", "ctd-new"}),
        ("DELETED", b, {"ctd-old"}),
        ("DELETED", a, {"ctd-old"}),  # its copy holds the same record still
        ("DELETED", copy, set()),
    ]
    present: dict[str, dict[str, Any]] = {}
    gateways: list[tuple[int, KeySecretsSource, InMemoryKeyStore]] = []
    for step, (kind, secret, expected) in enumerate(steps):
        for _, source, _ in gateways:
            source._event(kind, secret)
        if kind == "DELETED":
            del present[secret["metadata"]["name"]]
        else:
            present[secret["metadata"]["name"]] = secret
        store = InMemoryKeyStore()
        started = KeySecretsSource(None, "ns", store)  # type: ignore[arg-type]
        started._sync(list(present.values()))
        gateways.append((step, started, store))
        for started_at, _, store in gateways:
            assert _accepted(store, keys) == expected, (started_at, step)


async def test_a_key_file_holds_keys_as_key_secrets_do(tmp_path: Path) -> None:
    """Two entries of one name are two keys; a key given two different records
    is refused, as two Secrets giving it them would be."""
    one = KeyRecord(name="a", hash=hash_key("one"))
    two = KeyRecord(name="a", hash=hash_key("two"), rpm=5)
    clash = one.model_copy(update={"models": ("small",)})
    path = tmp_path / "keys.json"
    store = InMemoryKeyStore()
    watcher = keys_file_source(path, store, 0.0)
    for records, expected in (
        ([one, two], {"one", "two"}),
        ([two, one, clash], {"two"}),
    ):
        content = [r.model_dump(mode="json") for r in records]
        path.write_bytes(orjson.dumps({"keys": content}))
        os.utime(path, ns=(0, len(records)))  # seen as changed
        await watcher.check()
        assert _accepted(store, ["one", "two"]) == expected
        secrets = [key_secret(r, "ns") for r in records]
        for i, secret in enumerate(secrets):
            secret["metadata"]["name"] = f"key-{i}"
        from_secrets = InMemoryKeyStore()
        KeySecretsSource(None, "ns", from_secrets)._sync(secrets)  # type: ignore[arg-type]
        assert _accepted(from_secrets, ["one", "two"]) == expected


def test_vllm_metrics_parsing() -> None:
    text = """# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{model_name="m"} 2.0
vllm:kv_cache_usage_perc{model_name="m"} 0.5
vllm:bogus{model_name="m"} nan-ish
"""
    report = parse_vllm_metrics(text, 7.0)
    assert (report.running, report.waiting, report.kv_cache_usage) == (4, 2, 0.5)
    assert report.scraped_at == 7.0


@pytest.mark.parametrize(
    "kv", ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
)
def test_vllm_metrics_of_several_engines_average_the_kv_cache_use(kv: str) -> None:
    """With --data-parallel-size 2, vLLM exports each figure once per engine: a
    fraction of each engine's cache is averaged, not summed (two at 0.9 read as
    1.8); the requests are summed."""
    text = f"""vllm:num_requests_running{{engine="0",model_name="m"}} 3.0
vllm:num_requests_running{{engine="1",model_name="m"}} 1.0
vllm:num_requests_waiting{{engine="0",model_name="m"}} 2.0
vllm:num_requests_waiting{{engine="1",model_name="m"}} 5.0
{kv}{{engine="0",model_name="m"}} 0.9
{kv}{{engine="1",model_name="m"}} 0.7
"""
    report = parse_vllm_metrics(text, 0.0)
    assert (report.running, report.waiting) == (4, 7)
    assert report.kv_cache_usage == pytest.approx(0.8)


def test_vllm_metrics_read_the_value_before_a_timestamp() -> None:
    """A sample may end with a timestamp (`name{labels} value ms`): the value
    is the field after the labels, which may hold spaces and braces."""
    text = """vllm:num_requests_waiting{engine="0"} 3 1712345678000
vllm:num_requests_running 2 1712345678000
vllm:kv_cache_usage_perc{model_name="a } \\" b",engine="0"} 0.25 1712345678000
vllm:num_requests_running{model_name="x"}
"""
    report = parse_vllm_metrics(text, 0.0)
    assert (report.running, report.waiting, report.kv_cache_usage) == (2, 3, 0.25)


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf"])
def test_vllm_metrics_drop_a_sample_that_is_not_finite(bad: str) -> None:
    """Prometheus text allows NaN and infinities: read as figures, a NaN score
    could win kv-aware's min() (every comparison with it is false) and one NaN
    engine made the pod's mean KV-cache use NaN. Such a sample is no measure: its
    figure is not known, as one the replica does not export; the other engines'
    alone made a data-parallel pod look idler than it was."""
    text = f"""vllm:num_requests_running{{engine="0"}} {bad}
vllm:num_requests_running{{engine="1"}} 2
vllm:num_requests_waiting {bad}
vllm:kv_cache_usage_perc{{engine="0"}} {bad}
vllm:kv_cache_usage_perc{{engine="1"}} 0.6
vllm:num_requests_waiting{{engine="1"}} 1
"""
    report = parse_vllm_metrics(text, 0.0)
    assert report.figures() == (None, None, None)
    running = f'vllm:num_requests_running{{engine="0"}} {bad}'
    text = text.replace(running, 'vllm:num_requests_running{engine="0"} 3')
    assert parse_vllm_metrics(text, 0.0).figures() == (5, None, None)
    # The only sample of the newer name is not finite: the older name counts.
    text = f"vllm:kv_cache_usage_perc {bad}\nvllm:gpu_cache_usage_perc 0.3\n"
    assert parse_vllm_metrics(text, 0.0).kv_cache_usage == 0.3
    # None that is finite: as when the figure is missing, which is no 0 (an
    # idle replica's figure) but None, for kv-aware to leave out.
    missing = parse_vllm_metrics("", 0.0)
    assert missing.figures() == (None, None, None) and missing.scraped_at == 0.0
    report = parse_vllm_metrics(f"vllm:kv_cache_usage_perc {bad}\n", 0.0)
    assert report.kv_cache_usage == missing.kv_cache_usage


class _MetricsUpstream:
    """Answers /metrics per replica URL: text (200), a status, or a failure."""

    def __init__(self) -> None:
        self.answers: dict[str, str | int | Exception] = {}

    async def request(
        self, method: str, url: str, timeout_s: float | None = None
    ) -> Any:
        answer = self.answers[url.removesuffix("/metrics")]
        if isinstance(answer, Exception):
            raise answer

        class Response:
            status = answer if isinstance(answer, int) else 200

            async def read(self) -> bytes:
                return answer.encode() if isinstance(answer, str) else b""

        return Response()


def _kv_aware_catalog(clock: Callable[[], float]) -> Catalog:
    """A catalog with one kv-aware model, `m` in `llm`, and no replicas yet."""
    route = {
        "name": "m",
        "namespace": "llm",
        "servedName": "m",
        "service": "m",
        "strategy": "kv-aware",
    }
    catalog = Catalog(clock=clock)
    catalog.set_document(RoutingDocument.model_validate({"models": [route]}))
    return catalog


@pytest.mark.parametrize("failure", [UpstreamTimeout("slow"), 503])
async def test_a_failed_scrape_drops_the_last_report(
    failure: Exception | int,
) -> None:
    """The last figures were kept for ever: the busiest replica, whose
    /metrics times out, looked idle to kv-aware."""
    now = [0.0]
    catalog = _kv_aware_catalog(lambda: now[0])
    catalog.set_endpoints("llm", "m", [Endpoint("http://a")])
    upstream = _MetricsUpstream()
    scraper = MetricsScraper(catalog, upstream, 2.0, lambda: now[0])  # type: ignore[arg-type]
    upstream.answers["http://a"] = "vllm:num_requests_running 0\n"
    await scraper.scrape_once()
    replica = catalog.all_replicas()["http://a"]
    assert replica.load.scraped_at == 0.0
    upstream.answers["http://a"] = failure
    now[0] = 2.0
    await scraper.scrape_once()
    assert replica.load == LoadReport()
    # When it last answered stays, for /admin/replicas: unknown since then.
    assert replica.load_read_at == 0.0
    assert report_max_age_s(2.0) == 10.0


async def test_scrapes_run_a_bounded_number_at_a_time() -> None:
    """Every replica's /metrics was read at once: with thousands of replicas,
    each period opened thousands of connections together."""
    catalog = _kv_aware_catalog(lambda: 0.0)
    urls = [f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(300)]
    catalog.set_endpoints("llm", "m", [Endpoint(url) for url in urls])
    in_flight, most = 0, 0

    class Upstream(_MetricsUpstream):
        async def request(
            self, method: str, url: str, timeout_s: float | None = None
        ) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                for _ in range(3):  # the others start meanwhile, if they may
                    await asyncio.sleep(0)
                return await super().request(method, url, timeout_s)
            finally:
                in_flight -= 1

    upstream = Upstream()
    upstream.answers = dict.fromkeys(urls, "vllm:num_requests_running 1\n")
    scraper = MetricsScraper(catalog, upstream, 2.0, lambda: 3.0)  # type: ignore[arg-type]
    await scraper.scrape_once()
    assert most == MAX_CONCURRENT_SCRAPES
    replicas = catalog.all_replicas()
    assert all(replicas[url].load.scraped_at == 3.0 for url in urls)


class _HangingUpstream(_MetricsUpstream):
    """Answers as `_MetricsUpstream`, but the replicas in `hanging` time out a
    period after their read began, on the virtual clock `now`."""

    def __init__(self, now: list[float], period: float, hanging: set[str]) -> None:
        super().__init__()
        self.now, self.period, self.hanging = now, period, hanging

    async def request(
        self, method: str, url: str, timeout_s: float | None = None
    ) -> Any:
        if url.removesuffix("/metrics") not in self.hanging:
            return await super().request(method, url, timeout_s)
        began = self.now[0]
        for _ in range(3):  # the other readers start theirs meanwhile
            await asyncio.sleep(0)
        self.now[0] = max(self.now[0], began + self.period)
        raise UpstreamTimeout("slow")


async def test_replicas_that_hang_never_make_the_others_reports_stale() -> None:
    """Reads run 32 at a time and each hangs a period at most, so a round over
    200 hung replicas lasted 7 periods and the others' reports (5 periods old at
    most) were all stale: kv-aware fell back to counting requests in flight.
    Once found out, a failed replica's read starts in a round's first period
    only, after those of the replicas that answered last time."""
    period = 2.0
    now = [0.0]  # time moves when a hung read times out, a period after it began
    catalog = _kv_aware_catalog(lambda: now[0])
    hung = [f"http://10.0.1.{i}:8000" for i in range(200)]
    healthy = [f"http://10.0.2.{i}:8000" for i in range(8)]
    # The healthy ones listed last: a round in list order reached them last.
    catalog.set_endpoints("llm", "m", [Endpoint(url) for url in hung + healthy])

    upstream = _HangingUpstream(now, period, set(hung))
    upstream.answers = dict.fromkeys(healthy, "vllm:num_requests_running 1\n")
    scraper = MetricsScraper(catalog, upstream, period, lambda: now[0])  # type: ignore[arg-type]
    replicas = catalog.all_replicas()
    for n in range(6):
        began = now[0]
        await scraper.scrape_once()
        if n == 0:
            # Not known to hang yet, every one is read: a period per 32.
            assert now[0] - began == 7 * period
            continue
        # Found out: two periods at most, none started after the first.
        assert now[0] - began <= 2 * period, n
        # And the healthy ones are read first, at once.
        assert all(replicas[url].load.scraped_at == began for url in healthy)
    # No hung replica is skipped for good: each was tried again since they
    # were found out (64 a round).
    tried = scraper._tried_at
    assert all(tried[url] >= 7 * period for url in hung)
    assert all(replicas[url].load == LoadReport() for url in hung)


async def test_replicas_that_start_to_hang_together_leave_the_others_read() -> None:
    """Cut off after a period, a round left unread the replicas listed after
    64 that had just started to hang (a node gone), round after round until
    all were found out: only a replica whose read failed waits for the next
    round."""
    period = 2.0
    now = [0.0]
    catalog = _kv_aware_catalog(lambda: now[0])
    urls = [f"http://10.0.3.{i}:8000" for i in range(100)]
    catalog.set_endpoints("llm", "m", [Endpoint(url) for url in urls])
    hanging: set[str] = set()

    upstream = _HangingUpstream(now, period, hanging)
    upstream.answers = dict.fromkeys(urls, "vllm:num_requests_running 1\n")
    scraper = MetricsScraper(catalog, upstream, period, lambda: now[0])  # type: ignore[arg-type]
    await scraper.scrape_once()
    hanging.update(urls[:64])  # listed first, read first among equals
    now[0] = began = 10.0
    await scraper.scrape_once()
    replicas = catalog.all_replicas()
    assert all(replicas[url].load.scraped_at is not None for url in urls[64:])
    assert all(replicas[url].load.scraped_at >= began for url in urls[64:])  # type: ignore[operator]


def _pod_slice(name: str, service: str, *pods: tuple[str, str]) -> dict[str, object]:
    """A slice whose endpoints name their pods: (ip, pod uid) each."""
    slice_ = _slice(name, service)
    slice_["endpoints"] = [
        {"addresses": [ip], "targetRef": {"kind": "Pod", "uid": uid}}
        for ip, uid in pods
    ]
    return slice_


async def test_a_reused_ip_starts_afresh_unless_it_is_the_same_service_and_pod() -> (
    None
):
    """A pod's IP handed within 60 s to a new pod, maybe another model's: the new
    pod got the old one's ejection, back-off and load."""
    from citadel.gateway.sources.kubernetes import _SliceView

    now = [0.0]
    catalog = Catalog(clock=lambda: now[0])
    view = _SliceView("llm", catalog, {"a", "b"})
    ip = "http://10.0.0.5:8000"
    view.sync([_pod_slice("a-1", "a", ("10.0.0.5", "pod-1"))])
    old = catalog.all_replicas()[ip]
    old.ejected_until, old.ejections_in_row = 40.0, 3
    old.load = LoadReport(waiting=500, scraped_at=0.0)

    view.event("DELETED", _slice("a-1", "a"))  # pod-1 is deleted
    now[0] = 4.0
    # Its IP goes to a pod of another model's Service.
    view.event("ADDED", _pod_slice("b-1", "b", ("10.0.0.5", "pod-2")))
    new = catalog.all_replicas()[ip]
    assert new is not old and new.available(now[0]) and new.load == LoadReport()

    view.event("DELETED", _slice("b-1", "b"))
    now[0] = 8.0
    # Back in the Service it left, but another pod: afresh too.
    view.event("ADDED", _pod_slice("b-2", "b", ("10.0.0.5", "pod-3")))
    assert catalog.all_replicas()[ip] is not new

    newer = catalog.all_replicas()[ip]
    view.event("DELETED", _slice("b-2", "b"))
    now[0] = 9.0
    # The same pod in the same Service (moved to another slice): kept.
    view.event("ADDED", _pod_slice("b-3", "b", ("10.0.0.5", "pod-3")))
    assert catalog.all_replicas()[ip] is newer


def test_endpoint_slices_name_the_pod_behind_each_address() -> None:
    slice_ = _pod_slice("m-1", "m", ("10.0.0.1", "uid-1"))
    slice_["endpoints"].append({"addresses": ["10.0.0.2"]})  # type: ignore[attr-defined]
    assert [e.pod for e in slice_endpoints(slice_)] == ["uid-1", None]


async def test_a_routes_file_naming_one_service_with_two_endpoint_lists_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both models were silently routed to the second one's endpoints."""
    results: list[str] = []
    catalog = Catalog(results.append)
    path = tmp_path / "routes.json"
    llama = {**json.loads(doc("llama", ("http://127.0.0.1:8001",)))["models"][0]}
    path.write_text(json.dumps({"models": [llama]}))
    watcher = routes_file_source(path, catalog, 1.0)
    await watcher.check()
    qwen = {**llama, "name": "q", "servedName": "qwen"}
    # One server for both (one vLLM with two LoRA adapters): fine.
    path.write_text(json.dumps({"models": [llama, qwen]}))
    await watcher.check()
    assert catalog.resolve("qwen").service == "m"
    qwen["endpoints"] = ["http://127.0.0.1:8002"]
    path.write_text(json.dumps({"models": [llama, {**qwen, "servedName": "qwen2"}]}))
    await watcher.check()
    assert results == ["ok", "ok", "invalid"]
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "name the service 'm' with different endpoints" in str(
        error.error  # type: ignore[attr-defined]
    )
    # The last good document stays, with each model on its own endpoints.
    assert [r.url for r in catalog.replicas(catalog.resolve("llama"))] == [
        "http://127.0.0.1:8001"
    ]
    with pytest.raises(ModelNotFound):
        catalog.resolve("qwen2")


def _routes_configmap(served: str) -> dict[str, object]:
    return {
        "metadata": {"name": "citadel-routes", "resourceVersion": "7"},
        "data": {CONFIGMAP_KEY: doc(served, ())},
    }


def _stop_slice_watches(source: RoutesWatchSource) -> None:
    for task in source._slice_watches.values():
        task.cancel()


async def test_a_deleted_routes_configmap_keeps_the_document_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last document stays in force, and the gateway ready (every gateway
    turning unready would take the whole API down): the log and the reload
    gauge, which CitadelGatewayRoutesNotApplied reads, say it is gone."""
    metrics = GatewayMetrics()
    sample = metrics.registry.get_sample_value
    last = "citadel_gateway_config_last_reload_successful"
    catalog = Catalog(metrics.reloaded)
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    try:
        await source._sync([_routes_configmap("m")])
        route = catalog.resolve("m")
        assert sample(last) == 1
        await source._event("DELETED", _routes_configmap("m"))
        assert catalog.resolve("m") is route
        assert catalog.loaded  # /readyz stays 200
        assert sample(last) == 0
        assert sample("citadel_gateway_config_reloads_total", {"status": "missing"})
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "gone; keeping the last good one" in warning.getMessage()
        assert "ConfigMap deleted" in warning.error  # type: ignore[attr-defined]
        await source._event("ADDED", _routes_configmap("m"))  # the operator writes it
        assert sample(last) == 1
    finally:
        _stop_slice_watches(source)


async def test_a_routes_configmap_gone_from_a_new_list_counts_as_deleted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deleted while the watch was down, it is seen only in the list after a
    410: that was silent."""
    results: list[str] = []
    catalog = Catalog(results.append)
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    try:
        await source._sync([_routes_configmap("m")])
        route = catalog.resolve("m")
        caplog.clear()
        await source._sync([])
        assert catalog.resolve("m") is route
        assert results == ["ok", "missing"]
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "ConfigMap deleted" in warning.error  # type: ignore[attr-defined]
    finally:
        _stop_slice_watches(source)


async def test_no_routes_configmap_at_start_is_no_reload() -> None:
    """Before the operator first writes it, the gateway waits, unready: no
    document was offered, none refused."""
    results: list[str] = []
    catalog = Catalog(results.append)
    await RoutesWatchSource(None, "citadel-system", catalog)._sync([])  # type: ignore[arg-type]
    assert results == []
    assert not catalog.loaded


async def test_a_malformed_endpoint_slice_is_skipped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A slice of a shape the view did not expect raised out of the watch and
    ended it for good: the namespace's replicas stopped changing, unlogged."""
    from citadel.gateway.sources.kubernetes import _SliceView

    catalog = Catalog()
    view = _SliceView("llm", catalog, {"m"})
    bad_ports = {**_slice("m-2", "m", "10.0.0.2"), "ports": ["http"]}
    view.sync([_slice("m-1", "m", "10.0.0.1"), {"metadata": None}, bad_ports])
    assert list(catalog.all_replicas()) == ["http://10.0.0.1:8000"]
    view.event("ADDED", _slice("m-3", "m", "10.0.0.3"))
    # Edited into something unreadable: gone, as a gateway started now would
    # not read it either.
    bad_address = {**_slice("m-3", "m"), "endpoints": [{"addresses": [7]}]}
    view.event("MODIFIED", bad_address)
    view.event("MODIFIED", {"metadata": {"name": 3}})
    view.event("ADDED", _slice("m-4", "m", "10.0.0.4"))
    assert sorted(catalog.all_replicas()) == [
        "http://10.0.0.1:8000",
        "http://10.0.0.4:8000",
    ]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [getattr(r, "slice", None) for r in errors] == [
        None,
        "llm/m-2",
        "llm/m-3",
        None,
    ]
    assert "without a name" in errors[0].getMessage()


def test_key_secrets_of_an_unexpected_shape_are_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = KeyRecord(name="alice", hash=hash_key("a"), models=["*"])
    secret = key_secret(alice, "citadel-system")
    odd: list[dict[str, Any]] = [
        {**secret, "data": ["key.json"]},
        {**secret, "data": {"key.json": 5}},
        {"metadata": None, "data": None},
    ]
    for item in odd:
        assert key_from_secret(item) is None
    store = InMemoryKeyStore()
    source = KeySecretsSource(None, "citadel-system", store)  # type: ignore[arg-type]
    source._sync([secret, *odd])
    assert store.lookup(alice.hash) == alice
    for item in odd:
        source._event("MODIFIED", item)
    # The first edit turned alice's own Secret unreadable: her key stops.
    assert store.lookup(alice.hash) is None
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said.count("ignoring a malformed key Secret") == 3 * len(odd)
    assert "key disabled until its Secret is mended" in said


@pytest.mark.parametrize("data", [["routes.json"], {CONFIGMAP_KEY: 5}])
async def test_a_routes_configmap_of_an_unexpected_shape_is_refused(data: Any) -> None:
    results: list[str] = []
    catalog = Catalog(results.append)
    await RoutesWatchSource(None, "citadel-system", catalog)._sync(  # type: ignore[arg-type]
        [{"metadata": {"name": "citadel-routes"}, "data": data}]
    )
    assert results == ["invalid"]


class _DiesOnce:
    """A client whose first list fails in a way no watch retries (as before
    start()); then it lists `items`, and its watches stay quiet."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.lists = 0

    async def list(self, path: str, params: Any = None) -> Any:
        self.lists += 1
        if self.lists == 1:
            raise RuntimeError("KubeClient.start() was not called")
        return self.items, "1"

    async def watch(self, path: str, version: str, params: Any = None) -> Any:
        await asyncio.Event().wait()
        yield


@pytest.fixture
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_base, "RESTART_BASE_S", 0.0)


async def test_a_slice_watch_that_dies_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture, quick_restarts: None
) -> None:
    """A per-namespace watch that died stayed in the source's dict: its
    namespace's replicas froze until it left the routing document and came
    back."""
    metrics = GatewayMetrics()
    catalog = Catalog()
    api = _DiesOnce([_slice("m-1", "m", "10.0.0.1")])
    source = RoutesWatchSource(api, "citadel-system", catalog, metrics)  # type: ignore[arg-type]
    await source._load({"data": {CONFIGMAP_KEY: doc("m", ())}})
    route = catalog.resolve("m")
    task = source._slice_watches["llm"]
    try:
        await _until(lambda: catalog.replicas(route))
        assert [r.url for r in catalog.replicas(route)] == ["http://10.0.0.1:8000"]
        assert not task.done()
        assert source._slice_watches["llm"] is task
        [error] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert error.task == "EndpointSlices of llm"  # type: ignore[attr-defined]
        assert error.exc_info is not None and error.exc_info[0] is RuntimeError
        assert "starting it again" in error.getMessage()
        synced = {"resource": "endpointslices"}
        assert metrics.registry.get_sample_value(SYNCED, synced) == 1
        assert metrics.registry.get_sample_value(FAILURES, synced) == 1
        # Cancelled (its namespace no longer routed, or the gateway stopping):
        # quiet.
        caplog.clear()
        await source._load({"data": {CONFIGMAP_KEY: json.dumps({"models": []})}})
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.cancelled()
        assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    finally:
        _stop_slice_watches(source)


async def test_a_key_watch_that_dies_is_started_again(quick_restarts: None) -> None:
    alice = KeyRecord(name="alice", hash=hash_key("a"), models=["*"])
    store = InMemoryKeyStore()
    api = _DiesOnce([key_secret(alice, "citadel-system")])
    task = asyncio.create_task(KeySecretsSource(api, "citadel-system", store).run())  # type: ignore[arg-type]
    try:
        await _until(lambda: store.lookup(alice.hash) or task.done())
        assert store.lookup(alice.hash) == alice
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_work_that_ends_is_run_again_after_a_pause_that_grows() -> None:
    runs: list[str] = []
    pauses: list[float] = []
    now = [0.0]

    async def work() -> None:
        runs.append("run")
        if len(runs) == 3:
            return  # ended without an error: run again too
        if len(runs) == 4:
            now[0] += sources_base.RESTART_MAX_S  # lasted: the row ends
        if len(runs) == 6:
            raise asyncio.CancelledError
        raise KeyError("metadata")

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    with pytest.raises(asyncio.CancelledError):
        await sources_base.keep_running(
            work, "w", sleep, lambda: now[0], lambda low, high: high
        )
    assert len(runs) == 6
    assert pauses == [1, 2, 4, 1, 2]


async def test_a_source_that_dies_is_logged(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The app ran each source as a bare task, gathered only at shutdown."""

    class Failing:
        async def run(self) -> None:
            raise KeyError("metadata")

    class Ending:
        async def run(self) -> None:
            return

    harness.deps.sources.extend([Failing(), Ending()])
    async with harness.app.router.lifespan_context(harness.app):
        for _ in range(3):
            await asyncio.sleep(0)
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert [r.task for r in errors] == ["Failing", "Ending"]  # type: ignore[attr-defined]
        assert errors[0].exc_info is not None
        assert all("starting it again" in r.getMessage() for r in errors)


class _RaisesOnce(_MetricsUpstream):
    """Raises what no scrape expects (a bug) at its first call, then answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def request(
        self, method: str, url: str, timeout_s: float | None = None
    ) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return await super().request(method, url, timeout_s)


def _restarts(caplog: pytest.LogCaptureFixture, task: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelname == "ERROR"
        and getattr(r, "task", None) == task
        and "starting it again" in r.getMessage()
    ]


async def test_a_metrics_scraper_that_dies_is_started_again(
    kit: Any, caplog: pytest.LogCaptureFixture, quick_restarts: None
) -> None:
    """The app ran it once: a scraper that raised stayed dead, and kv-aware
    routing went without load figures until the gateway restarted."""
    harness = kit.build(kit.document(strategy="kv-aware"), replicas=("http://a",))
    upstream = _RaisesOnce()
    upstream.answers["http://a"] = "vllm:num_requests_waiting 3\n"
    scraper = MetricsScraper(harness.deps.catalog, upstream, 0.0, lambda: 5.0)  # type: ignore[arg-type]
    harness.deps.sources.append(scraper)
    replica = harness.deps.catalog.all_replicas()["http://a"]
    async with harness.app.router.lifespan_context(harness.app):
        await _until(lambda: replica.load.scraped_at is not None)
        assert replica.load.waiting == 3
        [error] = _restarts(caplog, "MetricsScraper")
        assert error.exc_info is not None and error.exc_info[0] is RuntimeError


async def test_a_file_watcher_that_dies_is_started_again(
    harness: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    quick_restarts: None,
) -> None:
    """The app ran it once: a routes or keys file watcher that raised stayed
    dead, the file's changes unseen until the gateway restarted. Started again,
    it loads the contents whose load raised."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": []}))
    loads: list[bytes] = []

    async def load(data: bytes) -> None:
        loads.append(data)
        if len(loads) == 1:
            raise RuntimeError("a bug")

    harness.deps.sources.append(FileWatcher(path, load, 0.0))
    async with harness.app.router.lifespan_context(harness.app):
        await _until(lambda: len(loads) == 2)
        [error] = _restarts(caplog, "FileWatcher")
        assert error.exc_info is not None and error.exc_info[0] is RuntimeError
        # And it watches on: a change is loaded.
        path.write_text(json.dumps({"keys": [], "more": 1}))
        await _until(lambda: len(loads) == 3)
    assert loads[0] == loads[1] != loads[2]


SYNCED = "citadel_gateway_watch_synced"
FAILURES = "citadel_gateway_watch_failures_total"


def test_the_watch_gauge_is_down_while_any_watch_of_its_resource_is() -> None:
    metrics = GatewayMetrics()

    def synced() -> float | None:
        return metrics.registry.get_sample_value(SYNCED, {"resource": "es"})

    metrics.watch_started("es", "llm")
    metrics.watch_started("es", "research")
    assert synced() == 0  # not listed yet
    metrics.watch_synced("es", "llm")
    assert synced() == 0
    metrics.watch_synced("es", "research")
    assert synced() == 1
    metrics.watch_failed("es", "research")
    metrics.watch_synced("es", "llm")
    assert synced() == 0  # one namespace stale is a stale view
    # A namespace no longer routed holds it down no more.
    metrics.watch_stopped("es", "research")
    assert synced() == 1
    assert metrics.registry.get_sample_value(FAILURES, {"resource": "es"}) == 1


def _two_namespaces() -> dict[str, object]:
    routes = [
        {"name": m, "namespace": m, "servedName": m, "service": m, "endpoints": []}
        for m in ("llm", "research")
    ]
    document = json.dumps({"schemaVersion": 1, "models": routes})
    return {
        "metadata": {"name": "citadel-routes", "resourceVersion": "7"},
        "data": {CONFIGMAP_KEY: document},
    }


class _QuietApi:
    """Lists the routes ConfigMap (two namespaces routed); refuses the lists of
    `refused` (403, as without RBAC there); lists anything else empty. Every
    watch stays quiet."""

    def __init__(self, refused: str) -> None:
        self.refused = refused

    async def list(self, path: str, params: Any = None) -> Any:
        if path.endswith("/configmaps"):
            return [_two_namespaces()], "7"
        if self.refused in path:
            raise KubeApiError(403, "forbidden")
        return [], "7"

    async def watch(self, path: str, version: str, params: Any = None) -> Any:
        await asyncio.Event().wait()
        yield


async def _until(done: Any) -> None:
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("not reached")


async def test_failing_watches_show_in_the_metrics() -> None:
    """A watch that kept failing (no RBAC in a namespace, an API server down)
    was only in the logs: the gateway routed on a stale view, unseen."""
    metrics = GatewayMetrics()
    sample = metrics.registry.get_sample_value
    api = _QuietApi(refused="/namespaces/research/")
    routes = RoutesWatchSource(api, "citadel-system", Catalog(), metrics)  # type: ignore[arg-type]
    keys = KeySecretsSource(api, "citadel-system", InMemoryKeyStore(), metrics)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(routes.run()), asyncio.create_task(keys.run())]
    try:
        await _until(lambda: sample(FAILURES, {"resource": "endpointslices"}))
        await _until(lambda: sample(SYNCED, {"resource": "secrets"}))
        assert sample(SYNCED, {"resource": "routes"}) == 1
        assert sample(SYNCED, {"resource": "secrets"}) == 1
        assert sample(SYNCED, {"resource": "endpointslices"}) == 0
        assert sample(FAILURES, {"resource": "endpointslices"}) == 1
        assert sample(FAILURES, {"resource": "routes"}) == 0
        # The namespace leaves the document: its watch holds the gauge no more.
        await routes._load({"data": {CONFIGMAP_KEY: doc("llm", ())}})
        assert sample(SYNCED, {"resource": "endpointslices"}) == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_the_kubernetes_watches_report_to_the_gateways_metrics() -> None:
    deps = build_deps(GatewaySettings(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    watches = [
        s for s in deps.sources if isinstance(s, (RoutesWatchSource, KeySecretsSource))
    ]
    assert len(watches) == 2
    assert all(s._health is deps.metrics for s in watches)


async def test_a_gzipped_routes_configmap_feeds_the_catalog() -> None:
    # What the operator writes once the document is too large for text.
    results: list[str] = []
    catalog = Catalog(results.append)
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    packed = base64.b64encode(gzip.compress(doc("big").encode())).decode()
    await source._sync([{"binaryData": {CONFIGMAP_GZIP_KEY: packed}}])
    for task in source._slice_watches.values():
        task.cancel()
    assert results == ["ok"]
    assert catalog.resolve("big").name == "m"


class _Lists:
    """A client that lists `configmaps` at the ConfigMaps' path (nothing
    elsewhere), and whose watches stay quiet."""

    def __init__(self, configmaps: list[dict[str, Any]]) -> None:
        self.configmaps = configmaps

    async def list(self, path: str, params: Any = None) -> Any:
        return (self.configmaps if path.endswith("/configmaps") else []), "1"

    async def watch(self, path: str, version: str, params: Any = None) -> Any:
        await asyncio.Event().wait()
        yield


class _HeldRead:
    """`read_document`, held until the event loop releases it: a read on the
    loop is still held when the loop next runs (after a 5 s timeout, there only
    to end such a read)."""

    def __init__(self, order: list[str]) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.order = order

    def __call__(self, raw: str | bytes) -> DocumentReading:
        self.started.set()
        self.release.wait(timeout=5)
        self.order.append("read")
        return read_document(raw)

    async def release_from_the_loop(self) -> None:
        await asyncio.to_thread(self.started.wait, 5)
        self.order.append("loop")
        self.release.set()


async def test_a_routes_configmap_is_read_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read on the event loop, a document of 40,000 models stalled every
    request in flight for about 1 s (no chunk relayed, no request taken)."""
    order: list[str] = []
    held = _HeldRead(order)
    monkeypatch.setattr(kube_source, "read_document", held)
    loaded = asyncio.Event()
    catalog = Catalog(lambda result: loaded.set())
    api = _Lists([_routes_configmap("m")])
    source = RoutesWatchSource(api, "citadel-system", catalog)  # type: ignore[arg-type]
    task = asyncio.create_task(source.run())
    try:
        await held.release_from_the_loop()
        await asyncio.wait_for(loaded.wait(), 5)
        assert order == ["loop", "read"]
        assert catalog.resolve("m").name == "m"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _stop_slice_watches(source)


async def test_a_routes_file_is_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    held = _HeldRead(order)
    monkeypatch.setattr(files_source, "read_document", held)
    loaded = asyncio.Event()
    catalog = Catalog(lambda result: loaded.set())
    path = tmp_path / "routes.json"
    path.write_text(doc("m"))
    task = asyncio.create_task(routes_file_source(path, catalog, 1.0).run())
    try:
        await held.release_from_the_loop()
        await asyncio.wait_for(loaded.wait(), 5)
        assert order == ["loop", "read"]
        assert len(catalog.replicas(catalog.resolve("m"))) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("older", [doc("older"), '{"models": "older"}'])
async def test_of_two_routes_configmaps_read_at_once_the_newer_wins(
    older: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever read ends last, the ConfigMap that came last is put in force,
    and its outcome alone is reported: the older one's (put in force, or
    refused) would leave the gateway on a stale document, or its reload gauge
    on a stale result."""
    older_may_end = threading.Event()

    def read(raw: str | bytes) -> DocumentReading:
        if "older" in str(raw):
            older_may_end.wait(timeout=5)
        return read_document(raw)

    monkeypatch.setattr(kube_source, "read_document", read)
    results: list[str] = []
    catalog = Catalog(results.append)
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    first = {"metadata": {"name": "citadel-routes"}, "data": {CONFIGMAP_KEY: older}}
    try:
        reading_older = asyncio.create_task(source._load(first))
        await asyncio.sleep(0)  # its read starts first
        await source._load(_routes_configmap("newer"))
        older_may_end.set()
        await reading_older
        assert catalog.resolve("newer").served_name == "newer"
        with pytest.raises(ModelNotFound):
            catalog.resolve("older")
        assert results == ["ok"]
    finally:
        _stop_slice_watches(source)


async def test_a_routes_configmap_deleted_while_read_is_not_put_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deletion that comes while a ConfigMap is read makes that read stale: put
    in force after, it would report `ok` with the ConfigMap gone and quiet the
    alert on the reload gauge."""
    may_end = threading.Event()

    def read(raw: str | bytes) -> DocumentReading:
        may_end.wait(timeout=5)
        return read_document(raw)

    monkeypatch.setattr(kube_source, "read_document", read)
    results: list[str] = []
    catalog = Catalog(results.append)
    source = RoutesWatchSource(None, "citadel-system", catalog)  # type: ignore[arg-type]
    try:
        reading = asyncio.create_task(source._load(_routes_configmap("m")))
        await asyncio.sleep(0)  # its read starts first
        await source._event("DELETED", _routes_configmap("m"))
        may_end.set()
        await reading
        assert results == ["missing"]
        assert not catalog.loaded
    finally:
        _stop_slice_watches(source)


def test_a_table_made_against_a_document_no_longer_in_force_is_made_again() -> None:
    """A model a document left out keeps its route from the document in force
    when the document is put in force, not from the older one it was read
    against (in a worker thread, while another was put in force)."""
    route = json.loads(doc("m"))["models"][0]

    def reading(rpm: int) -> DocumentReading:
        return read_document(
            json.dumps({"models": [{**route, "limits": {"rpm": rpm}}]})
        )

    catalog = Catalog()
    catalog.put_in_force(routing_table(reading(5), catalog.document))
    table = routing_table(reading(0), catalog.document)  # rpm 0: left out
    catalog.put_in_force(routing_table(reading(7), catalog.document))
    catalog.put_in_force(table)
    assert catalog.resolve("m").limits.rpm == 7
